// Swarm dashboard front end (anywidget ESM, no build step).
// Every value shown here may come from a remote peer, so the DOM is built with
// createElement/textContent only: peer-supplied text can never become markup.

const STATES = ["active", "idle", "disabled"];
const PEER_ID_CHARS = 16;

function h(tag, options = {}, children = []) {
  const el = document.createElement(tag);
  if (options.cls) el.className = options.cls;
  if (options.testid) el.dataset.testid = options.testid;
  if (options.title !== undefined && options.title !== null) el.title = String(options.title);
  if (options.text !== undefined && options.text !== null) el.textContent = String(options.text);
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function count(value) {
  const n = Number(value);
  return Number.isFinite(n) ? n : 0;
}

function list(value) {
  return Array.isArray(value) ? value : [];
}

function text(value, fallback = "") {
  return value === null || value === undefined ? fallback : String(value);
}

function shortId(id) {
  const full = text(id, "unknown");
  return full.length > PEER_ID_CHARS ? `${full.slice(0, PEER_ID_CHARS)}…` : full;
}

function peerId(id) {
  return h("code", { cls: "swarm-nb-peer-id", text: shortId(id), title: text(id) });
}

function clock(timestamp) {
  const seconds = Number(timestamp);
  if (!Number.isFinite(seconds) || seconds <= 0) return "";
  return new Date(seconds * 1000).toLocaleTimeString();
}

function chips(values, emptyText = "no capabilities") {
  const items = list(values);
  if (items.length === 0) return h("span", { cls: "swarm-nb-muted", text: emptyText });
  return h(
    "span",
    { cls: "swarm-nb-chips" },
    items.map((value) => h("span", { cls: "swarm-nb-chip", text: text(value) })),
  );
}

function more(snapshot, key) {
  const omitted = snapshot.omitted && count(snapshot.omitted[key]);
  return omitted ? h("div", { cls: "swarm-nb-muted", text: `+${omitted} more not shown` }) : null;
}

function statCard(label, value, testid, tone) {
  return h("div", { cls: `swarm-nb-stat swarm-nb-tone-${tone}` }, [
    h("div", { cls: "swarm-nb-stat-label", text: label }),
    h("div", { cls: "swarm-nb-stat-value", testid, text: value }),
  ]);
}

function header(status) {
  const state = STATES.includes(status.state) ? status.state : "disabled";
  return h("div", { cls: "swarm-nb-header" }, [
    h("span", { cls: "swarm-nb-title", text: "♁ Swarm" }),
    h("span", {
      cls: `swarm-nb-state swarm-nb-state--${state}`,
      testid: "status-state",
      text: state,
    }),
    h("span", { cls: "swarm-nb-metric", text: text(status.primary_metric) }),
    h("span", { cls: "swarm-nb-metric", text: text(status.secondary_metric) }),
    status.message && !status.error
      ? h("span", { cls: "swarm-nb-muted swarm-nb-message", text: status.message })
      : null,
  ]);
}

function errorBanner(status) {
  const error = status.error;
  if (!error) return null;
  const banner = h("div", { cls: "swarm-nb-error", testid: "error" }, [
    h("strong", { text: `⚠ ${text(error.code, "error")}` }),
    " ",
    text(error.message),
  ]);
  banner.setAttribute("role", "alert");
  return banner;
}

function row(label, value) {
  return h("div", { cls: "swarm-nb-kv" }, [
    h("span", { cls: "swarm-nb-kv-label", text: label }),
    value instanceof Node ? value : h("span", { text: text(value) }),
  ]);
}

function loadBar(load) {
  const fraction = Math.min(1, Math.max(0, count(load)));
  const fill = h("div", { cls: "swarm-nb-load-fill" });
  fill.style.width = `${Math.round(fraction * 100)}%`;
  if (fraction >= 0.8) fill.classList.add("swarm-nb-load-high");
  return h("div", { cls: "swarm-nb-load", title: `load ${Math.round(fraction * 100)}%` }, [fill]);
}

// peerStates: the Python PeerState names, from the model's "states" trait.
function peerRow(peer, peerStates) {
  // A state this page does not know is drawn like a peer that is gone.
  const state = peerStates.includes(peer.state) ? peer.state : "gone";
  const rtt = Number(peer.rtt_ms);
  return h("div", { cls: "swarm-nb-peer", testid: "peer-row" }, [
    h("div", { cls: "swarm-nb-peer-head" }, [
      h("span", {}, [
        peer.name ? h("strong", { cls: "swarm-nb-peer-name", text: text(peer.name) }) : null,
        peer.name ? " " : null,
        peerId(peer.id),
      ]),
      h("span", { cls: `swarm-nb-badge swarm-nb-peer--${state}`, text: text(peer.state, "?") }),
    ]),
    h("div", { cls: "swarm-nb-peer-body" }, [
      chips(peer.capabilities),
      h("span", { cls: "swarm-nb-peer-load" }, [
        loadBar(peer.load),
        h("span", {
          cls: "swarm-nb-muted",
          text: `${count(peer.in_flight)}/${count(peer.concurrency)}`,
          title: "tasks in flight / concurrency",
        }),
        Number.isFinite(rtt) && peer.rtt_ms !== null
          ? h("span", { cls: "swarm-nb-muted", text: `${rtt.toFixed(1)} ms` })
          : null,
      ]),
      linkFacts(peer),
    ]),
  ]);
}

function megabytes(n) {
  return `${(count(n) / 1e6).toFixed(1)} MB`;
}

// How the link reaches the peer (host / srflx / relay, via which server), what crossed it,
// and whether the peer runs others' code without isolation: the facts doctor reports.
function linkFacts(peer) {
  const facts = [];
  if (peer.route) {
    const via = peer.ice_server ? ` via ${text(peer.ice_server)}` : "";
    facts.push(
      h("span", {
        cls: `swarm-nb-chip swarm-nb-route--${text(peer.route)}`,
        testid: "peer-route",
        text: `${text(peer.route)}${via}`,
      }),
    );
  }
  if (peer.bytes_in || peer.bytes_out) {
    facts.push(
      h("span", {
        cls: "swarm-nb-muted",
        testid: "peer-bytes",
        text: `↓ ${megabytes(peer.bytes_in)} ↑ ${megabytes(peer.bytes_out)}`,
      }),
    );
  }
  if (peer.isolation === "none") {
    facts.push(
      h("span", {
        cls: "swarm-nb-badge swarm-nb-unsafe",
        testid: "peer-unsafe",
        text: "runs code without isolation",
        title: "this peer's owner passed --unsafe-no-isolation",
      }),
    );
  }
  return facts.length ? h("div", { cls: "swarm-nb-peer-link" }, facts) : null;
}

function swarmStatus(snapshot) {
  if (!snapshot.initialized) {
    return h("div", { cls: "swarm-nb-empty" }, [
      h("strong", { text: "Coordinator not initialized" }),
      h("div", { cls: "swarm-nb-muted", text: "Click Initialize to join the swarm." }),
    ]);
  }
  return h("div", { cls: "swarm-nb-block" }, [
    row("Local peer", h("code", { cls: "swarm-nb-peer-id", text: text(snapshot.local_peer_id, "Unknown") })),
    row(
      "Connected",
      h("span", {
        testid: "peer-count",
        text: `${count(snapshot.connected_peers)} / ${count(snapshot.total_peers)}`,
      }),
    ),
    row("Capabilities", chips(snapshot.capabilities)),
  ]);
}

function peersList(snapshot, peerStates) {
  const peers = list(snapshot.peers);
  if (peers.length === 0) return h("div", { cls: "swarm-nb-muted", text: "No peers connected" });
  const rows = peers.map((peer) => peerRow(peer, peerStates));
  return h("div", {}, [h("div", { cls: "swarm-nb-scroll" }, rows), more(snapshot, "peers")]);
}

function tasksInFlight(snapshot) {
  const tasks = list(snapshot.tasks_in_flight);
  const body =
    tasks.length === 0
      ? h("div", { cls: "swarm-nb-muted", text: "No tasks in flight" })
      : h("table", { cls: "swarm-nb-table" }, [
          h("thead", {}, [
            h("tr", {}, ["Task", "Type", "Peer", "State", "Elapsed"].map((t) => h("th", { text: t }))),
          ]),
          h(
            "tbody",
            {},
            tasks.map((task) =>
              h("tr", {}, [
                h("td", {}, [h("code", { text: shortId(task.id), title: text(task.id) })]),
                h("td", { text: text(task.type) }),
                h("td", {}, [peerId(task.peer)]),
                h("td", { text: text(task.state) }),
                h("td", { text: `${count(task.elapsed_s).toFixed(1)} s` }),
              ]),
            ),
          ),
        ]);
  return h("div", { testid: "tasks-in-flight" }, [body, more(snapshot, "tasks_in_flight")]);
}

function voteList(label, tone, entries) {
  return h("div", { cls: `swarm-nb-votes swarm-nb-tone-${tone}` }, [
    h("div", { cls: "swarm-nb-votes-label", text: `${label} (${entries.length})` }),
    entries.length === 0
      ? h("div", { cls: "swarm-nb-muted", text: "—" })
      : h(
          "ul",
          {},
          entries.map(([peer, reason]) =>
            h("li", {}, [peerId(peer), reason ? h("span", { cls: "swarm-nb-muted", text: ` ${reason}` }) : null]),
          ),
        ),
  ]);
}

function consensus(snapshot) {
  const latest = snapshot.latest_consensus;
  if (!latest) {
    return h("div", { testid: "consensus", cls: "swarm-nb-muted", text: "No consensus requested yet" });
  }
  const votes = latest.votes && typeof latest.votes === "object" ? Object.entries(latest.votes) : [];
  const approve = votes.filter(([, v]) => v && v.approve === true).map(([p, v]) => [p, text(v.reason)]);
  const reject = votes.filter(([, v]) => !(v && v.approve === true)).map(([p, v]) => [p, text(v && v.reason)]);
  const missing = list(latest.missing).map((p) => [p, ""]);
  const verdict =
    latest.consensus === true
      ? ["✓ Approved", "swarm-nb-tone-success"]
      : latest.consensus === false
        ? ["✗ Rejected", "swarm-nb-tone-error"]
        : ["… Voting", "swarm-nb-tone-muted"];
  return h("div", { testid: "consensus", cls: "swarm-nb-block" }, [
    h("div", { cls: "swarm-nb-consensus-head" }, [
      h("span", { cls: `swarm-nb-badge ${verdict[1]}`, text: verdict[0] }),
      h("code", { text: text(latest.target, "(no target)") }),
      h("span", { cls: `swarm-nb-badge swarm-nb-risk--${text(latest.risk, "unknown")}`, text: `risk ${text(latest.risk, "?")}` }),
    ]),
    latest.reason ? h("div", { cls: "swarm-nb-muted", text: text(latest.reason) }) : null,
    h("div", { cls: "swarm-nb-grid2" }, [
      voteList("For", "success", approve),
      voteList("Against", "error", reject),
    ]),
    missing.length ? voteList("Missing", "muted", missing) : null,
  ]);
}

function reflections(snapshot) {
  const items = list(snapshot.latest_reflections);
  if (items.length === 0) {
    return h("div", { testid: "reflections", cls: "swarm-nb-muted", text: "No reflections shared yet" });
  }
  return h("div", { testid: "reflections" }, [
    h(
      "ul",
      { cls: "swarm-nb-reflections" },
      items.map((item) =>
        h("li", {}, [
          h("div", { cls: "swarm-nb-reflection-head" }, [
            h("span", { cls: "swarm-nb-chip", text: text(item.category, "general") }),
            item.outcome ? h("span", { cls: "swarm-nb-badge", text: text(item.outcome) }) : null,
            h("span", { cls: "swarm-nb-muted" }, [
              item.shared_from ? "shared from " : "local",
              item.shared_from ? peerId(item.shared_from) : null,
              item.timestamp ? ` · ${clock(item.timestamp)}` : "",
            ]),
          ]),
          h("div", { text: text(item.description) }),
        ]),
      ),
    ),
    more(snapshot, "latest_reflections"),
  ]);
}

function activity(snapshot) {
  return h("div", { cls: "swarm-nb-grid2" }, [
    statCard("Consensus Requests", count(snapshot.consensus_requests), "stat-consensus", "info"),
    statCard("Knowledge Queries", count(snapshot.knowledge_queries), "stat-knowledge", "info"),
  ]);
}

export default {
  render({ model, el }) {
    const openSections = new Map();
    const root = h("div", { cls: "swarm-nb-panel" });
    el.append(root);

    function section(name, title, content) {
      const details = h("details", { cls: "swarm-nb-section" }, [
        h("summary", { text: title }),
        content,
      ]);
      details.open = openSections.get(name) ?? true;
      details.dataset.section = name;
      details.addEventListener("toggle", () => openSections.set(name, details.open));
      return details;
    }

    function initButton(snapshot) {
      const busy = model.get("busy") === true;
      const button = h("button", {
        cls: "swarm-nb-button",
        testid: "init-button",
        text: busy ? "⏳ Initializing…" : `▶ ${snapshot.initialized ? "Reinitialize" : "Initialize"}`,
      });
      button.type = "button";
      button.disabled = busy;
      button.addEventListener("click", () => {
        button.disabled = true;
        button.textContent = "⏳ Initializing…";
        model.send({ action: "initialize" });
      });
      return button;
    }

    function render() {
      const snapshot = model.get("snapshot") || {};
      const status = model.get("status") || {};
      const peerStates = list((model.get("states") || {}).peer);
      const scroller = root.querySelector(".swarm-nb-scroll");
      const scrollTop = scroller ? scroller.scrollTop : 0;
      const peers = list(snapshot.peers);
      const last = snapshot.last_activity;
      root.dataset.state = STATES.includes(status.state) ? status.state : "disabled";
      root.replaceChildren(
        header(status),
        errorBanner(status) || "",
        h("div", { cls: "swarm-nb-stats" }, [
          statCard("Tasks", count(snapshot.total_tasks), "stat-tasks", "active"),
          statCard("Success", status.success_rate == null ? "-" : `${count(status.success_rate)}%`, "stat-success", "success"),
          statCard("Patterns", count(snapshot.patterns_shared), "stat-patterns", "pattern"),
        ]),
        section("status", "Swarm Status", swarmStatus(snapshot)),
        snapshot.initialized ? section("peers", `Connected Peers (${peers.length})`, peersList(snapshot, peerStates)) : "",
        activity(snapshot),
        section("tasks", `Tasks in Flight (${list(snapshot.tasks_in_flight).length})`, tasksInFlight(snapshot)),
        section("consensus", "Latest Consensus", consensus(snapshot)),
        section("reflections", "Shared Reflections", reflections(snapshot)),
        h("div", { cls: "swarm-nb-footer" }, [
          initButton(snapshot),
          last && last.kind
            ? h("span", { cls: "swarm-nb-muted", text: `Last activity: ${text(last.kind)} ${clock(last.timestamp)}` })
            : null,
        ]),
      );
      const newScroller = root.querySelector(".swarm-nb-scroll");
      if (newScroller) newScroller.scrollTop = scrollTop;
    }

    // One kernel update can change snapshot and status together: draw once per update.
    let scheduled = false;
    let closed = false;
    function scheduleRender() {
      if (scheduled) return;
      scheduled = true;
      queueMicrotask(() => {
        scheduled = false;
        if (!closed) render();
      });
    }

    render();
    const events = ["change:snapshot", "change:status", "change:busy"];
    for (const event of events) model.on(event, scheduleRender);
    return () => {
      closed = true;
      for (const event of events) model.off(event, scheduleRender);
      root.remove();
    };
  },
};
