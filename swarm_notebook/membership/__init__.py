"""Who is in the room: signed agent cards, load reports, and ``choose_peer`` routing."""
