"""Pure data views of a coordinator's state: pandas frames and the dashboard status."""
