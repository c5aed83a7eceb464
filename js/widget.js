// Swarm dashboard front end (anywidget ESM, no build step).
// Every value shown here may come from a remote peer, so the DOM is built with
// createElement/textContent only: peer-supplied text can never become markup.

const STATES = ["active", "idle", "disabled"];
const PEER_ID_CHARS = 16;
const SVG_NS = "http://www.w3.org/2000/svg";
// The task stream zooms to recent activity, never closer than this many seconds.
const STREAM_MIN_SPAN_S = 10;
const SPARK_MIN_SPAN_S = 30;
// A finished task lasting a few milliseconds still gets a bar one can see and hover.
const MIN_BAR_UNITS = 6;
const STREAM_UNITS = 1000;
const ROW_UNITS = 10;
const ROW_PX = 12;
// A peer running many tasks at once gets this many rows at most; the rest overlap.
const MAX_ROWS = 8;
const SPARK_WIDTH = 300;
const SPARK_HEIGHT = 40;
// Below this rate the sparkline stays flat instead of magnifying heartbeats.
const SPARK_FLOOR_BPS = 1024;
const RECONNECT_HELP =
  "To reconnect, run the cell that joins the swarm (%swarm join … or " +
  "c = await swarm_notebook.join(…)), then show a new panel with %swarm dashboard (or c.dashboard()).";

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

// SVG nodes: attributes are numbers or names this file chooses; peer text goes in <title>.
function svg(tag, attrs = {}, children = []) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  for (const child of children) if (child) el.append(child);
  return el;
}

function svgTitle(value) {
  const title = document.createElementNS(SVG_NS, "title");
  title.textContent = text(value);
  return title;
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
  const state = STATES.includes(status.state) || status.state === "disconnected" ? status.state : "disabled";
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

function meter(value, label) {
  const fraction = Math.min(1, Math.max(0, count(value)));
  const fill = h("div", { cls: "swarm-nb-load-fill" });
  fill.style.width = `${Math.round(fraction * 100)}%`;
  if (fraction >= 0.8) fill.classList.add("swarm-nb-load-high");
  return h("div", { cls: "swarm-nb-load", title: `${label} ${Math.round(fraction * 100)}%` }, [fill]);
}

function loadBar(load) {
  return meter(load, "load");
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
    const dask = peer.backend === "dask";
    facts.push(
      h("span", {
        cls: "swarm-nb-badge swarm-nb-unsafe",
        testid: "peer-unsafe",
        text: dask ? "runs code without isolation (Dask cluster)" : "runs code without isolation",
        title: dask
          ? "this peer runs tasks on a Dask cluster, unsandboxed; it serves only its allowlist"
          : "this peer's owner passed --unsafe-no-isolation",
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

function seconds(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return "";
  return n < 1 ? `${Math.round(n * 1000)} ms` : `${n.toFixed(n < 10 ? 2 : 1)} s`;
}

function rate(bytesPerSecond) {
  const n = count(bytesPerSecond);
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB/s`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB/s`;
  return `${Math.round(n)} B/s`;
}

function laneLabel(lane) {
  return h("span", { cls: "swarm-nb-ts-label", title: text(lane.peer) }, [
    lane.name ? h("strong", { text: text(lane.name) }) : null,
    lane.name ? " " : null,
    h("code", { cls: "swarm-nb-peer-id", text: shortId(lane.peer).slice(0, 9) }),
  ]);
}

// stream: the kernel's task_stream; now: the kernel's clock as this page estimates it;
// taskStates: the Python TaskState names (a state not among them is drawn as "unknown").
function taskStream(stream, now, taskStates) {
  const lanes = list(stream && stream.lanes);
  const bars = list(stream && stream.bars);
  const windowS = count(stream && stream.window_s) || 300;
  if (lanes.length === 0) {
    const minutes = Math.round(windowS / 60);
    return h("div", { cls: "swarm-nb-muted", text: `No tasks ran on peers in the last ${minutes} min` });
  }
  const earliest = Math.min(...bars.map((bar) => count(bar.start)));
  const span = Math.min(windowS, Math.max(STREAM_MIN_SPAN_S, now - earliest + 1));
  const x = (t) => Math.max(0, Math.min(STREAM_UNITS, ((t - (now - span)) / span) * STREAM_UNITS));
  const byLane = lanes.map(() => []);
  for (const bar of bars) {
    const lane = Number(bar.lane);
    if (Number.isInteger(lane) && lane >= 0 && lane < lanes.length) byLane[lane].push(bar);
  }
  const rows = lanes.map((lane, index) => {
    // Tasks that overlap on one peer (its concurrency) stack in rows, like Dask's threads.
    const slotEnds = [];
    const placed = byLane[index]
      .slice()
      .sort((a, b) => count(a.start) - count(b.start))
      .map((bar) => {
        const running = bar.end === null || bar.end === undefined;
        const start = x(count(bar.start));
        const end = Math.max(start + MIN_BAR_UNITS, x(running ? now : count(bar.end)));
        let slot = slotEnds.findIndex((busyUntil) => busyUntil <= start);
        if (slot === -1) slot = slotEnds.length < MAX_ROWS ? slotEnds.push(0) - 1 : MAX_ROWS - 1;
        slotEnds[slot] = Math.max(slotEnds[slot], end);
        return { bar, running, start, end, slot };
      });
    const slots = Math.max(1, slotEnds.length);
    const rects = placed.map(({ bar, running, start, end, slot }) => {
      const state = taskStates.includes(bar.state) ? bar.state : "unknown";
      const took = running ? "running" : seconds(count(bar.end) - count(bar.start));
      return svg(
        "rect",
        {
          class: `swarm-nb-ts-bar swarm-nb-ts--${state}`,
          x: start.toFixed(1),
          y: slot * ROW_UNITS + 1,
          width: (end - start).toFixed(1),
          height: ROW_UNITS - 2,
          "data-testid": "stream-bar",
          "data-state": state,
          "vector-effect": "non-scaling-stroke",
        },
        [svgTitle(`${text(bar.type)} ${shortId(bar.id)} · ${text(bar.state)} · ${took}`)],
      );
    });
    const plot = svg(
      "svg",
      {
        class: "swarm-nb-ts-plot",
        viewBox: `0 0 ${STREAM_UNITS} ${slots * ROW_UNITS}`,
        preserveAspectRatio: "none",
      },
      rects,
    );
    plot.style.height = `${slots * ROW_PX}px`;
    const row = h("div", { cls: "swarm-nb-ts-lane", testid: "stream-lane" }, [laneLabel(lane), plot]);
    row.dataset.peer = text(lane.peer);
    return row;
  });
  const omitted = count(stream.omitted);
  return h("div", {}, [
    ...rows,
    h("div", { cls: "swarm-nb-ts-axis swarm-nb-muted" }, [
      h("span", { text: `−${Math.round(span)} s` }),
      h("span", { text: omitted ? `${omitted} older tasks not shown` : "" }),
      h("span", { text: "now" }),
    ]),
  ]);
}

function sparkline(transfer, now) {
  const samples = list(transfer && transfer.samples).filter((s) => Array.isArray(s) && s.length >= 3);
  if (samples.length === 0) {
    return h("div", { cls: "swarm-nb-muted", testid: "sparkline-empty", text: "No transfer samples yet" });
  }
  const first = count(samples[0][0]);
  const span = Math.max(SPARK_MIN_SPAN_S, now - first);
  const peak = Math.max(SPARK_FLOOR_BPS, ...samples.map((s) => Math.max(count(s[1]), count(s[2]))));
  const point = (s, column) => {
    const px = ((count(s[0]) - (now - span)) / span) * SPARK_WIDTH;
    const py = SPARK_HEIGHT - 1 - (count(s[column]) / peak) * (SPARK_HEIGHT - 2);
    return `${Math.max(0, Math.min(SPARK_WIDTH, px)).toFixed(1)},${py.toFixed(1)}`;
  };
  const line = (column, cls, testid) =>
    svg("polyline", {
      class: cls,
      points: samples.map((s) => point(s, column)).join(" "),
      "data-testid": testid,
      "data-points": samples.length,
      "vector-effect": "non-scaling-stroke",
    });
  const last = samples[samples.length - 1];
  return h("div", { cls: "swarm-nb-spark" }, [
    svg(
      "svg",
      {
        class: "swarm-nb-spark-plot",
        viewBox: `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`,
        preserveAspectRatio: "none",
        "data-testid": "sparkline",
      },
      [
        line(1, "swarm-nb-spark-in", "sparkline-in"),
        line(2, "swarm-nb-spark-out", "sparkline-out"),
      ],
    ),
    h("div", { cls: "swarm-nb-spark-legend" }, [
      h("span", { cls: "swarm-nb-spark-key-in", testid: "rate-in", text: `↓ ${rate(last[1])}` }),
      h("span", { cls: "swarm-nb-spark-key-out", testid: "rate-out", text: `↑ ${rate(last[2])}` }),
      h("span", { cls: "swarm-nb-muted", text: `peak ${rate(peak)} · last ${Math.round(span)} s` }),
    ]),
  ]);
}

function recentTasks(snapshot, taskStates) {
  const tasks = list(snapshot.recent_tasks);
  if (tasks.length === 0) {
    return h("div", { testid: "recent-tasks", cls: "swarm-nb-muted", text: "No finished tasks yet" });
  }
  return h("div", { testid: "recent-tasks" }, [
    h("table", { cls: "swarm-nb-table" }, [
      h("thead", {}, [
        h("tr", {}, ["Task", "Type", "Peer", "State", "Took", "Finished"].map((t) => h("th", { text: t }))),
      ]),
      h(
        "tbody",
        {},
        tasks.map((task) => {
          const state = taskStates.includes(task.state) ? task.state : "unknown";
          return h("tr", { testid: "recent-task" }, [
            h("td", {}, [h("code", { text: shortId(task.id).slice(0, 9), title: text(task.id) })]),
            h("td", { text: text(task.type) }),
            h("td", {}, [
              task.peer && task.sent
                ? h("span", {}, [task.name ? `${text(task.name)} ` : null, peerId(task.peer)])
                : h("span", { cls: "swarm-nb-muted", text: "not sent", title: "refused here before any peer saw it" }),
            ]),
            h("td", {}, [
              h("span", {
                cls: `swarm-nb-badge swarm-nb-ts-badge swarm-nb-ts--${state}`,
                text: text(task.state),
                title: text(task.error),
              }),
            ]),
            h("td", { text: task.duration_s === null ? "" : seconds(task.duration_s) }),
            h("td", { text: clock(task.finished_at) }),
          ]);
        }),
      ),
    ]),
  ]);
}

function bytes(value) {
  const n = count(value);
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${Math.round(n)} B`;
}

// A holder or owner, {peer, name}: its card's name, else its short id; the id on hover.
function peerLabel(entry) {
  const id = text(entry && entry.peer);
  const name = entry && entry.name;
  return h("span", { cls: name ? "swarm-nb-peer-name" : "swarm-nb-peer-id", title: id, text: name ? text(name) : shortId(id) });
}

function joined(items, separator = ", ") {
  const out = [];
  items.forEach((item, index) => {
    if (index) out.push(separator);
    out.push(item);
  });
  return out;
}

function storeUsage(store) {
  if (!store) return null;
  const max = count(store.max_bytes);
  const spillMax = count(store.max_spill_bytes);
  const refused = count(store.refusals);
  const full = count(store.refused_full);
  return h("div", { cls: "swarm-nb-block swarm-nb-store", testid: "store-usage" }, [
    row(
      "In memory",
      h("span", { cls: "swarm-nb-peer-load" }, [
        meter(max ? count(store.memory_bytes) / max : 0, "memory"),
        h("span", { testid: "store-memory", text: `${bytes(store.memory_bytes)} / ${bytes(max)}` }),
      ]),
    ),
    row(
      "Spilled",
      spillMax
        ? h("span", { cls: "swarm-nb-peer-load" }, [
            meter(count(store.spilled_bytes) / spillMax, "spill folder"),
            h("span", { testid: "store-spill", text: `${bytes(store.spilled_bytes)} / ${bytes(spillMax)}` }),
          ])
        : h("span", { cls: "swarm-nb-muted", testid: "store-spill", text: "no spill folder" }),
    ),
    row("Refs held", h("span", { testid: "store-refs", text: String(count(store.refs)) })),
    row(
      "Counters",
      h("span", {
        testid: "store-counters",
        text:
          `${count(store.evicted)} evicted · ${count(store.spills)} spilled · ` +
          `${refused} refused${full ? ` (${full} store full)` : ""}`,
      }),
    ),
  ]);
}

function refWhere(ref) {
  // Not ours: another peer's data kept in this peer's store.
  if (ref.role !== "owned") return h("span", {}, ["here, for ", peerLabel(ref.owner)]);
  const holders = list(ref.holders);
  if (holders.length === 0) return h("span", { cls: "swarm-nb-muted", text: "no holder" });
  return h("span", {}, joined(holders.map(peerLabel)));
}

// refStates: the Python RefState names (a state not among them is drawn as "unknown").
function residentData(data, refStates) {
  const resident = data && typeof data === "object" ? data : {};
  const refs = list(resident.refs);
  const omitted = count(resident.omitted);
  const table =
    refs.length === 0
      ? h("div", {
          cls: "swarm-nb-muted",
          testid: "refs-empty",
          text: "No resident data: ref = await c.put(value) keeps a value on a peer.",
        })
      : h("table", { cls: "swarm-nb-table" }, [
          h("thead", {}, [
            h("tr", {}, ["Ref", "Size", "Value", "Holders", "State"].map((t) => h("th", { text: t }))),
          ]),
          h(
            "tbody",
            {},
            refs.map((ref) => {
              const state = refStates.includes(ref.state) ? ref.state : "unknown";
              const tr = h("tr", { testid: "ref-row" }, [
                h("td", {}, [h("code", { text: text(ref.ref_id).slice(0, 8), title: text(ref.ref_id) })]),
                h("td", { text: bytes(ref.size) }),
                h("td", { cls: "swarm-nb-ref-value", text: text(ref.summary) }),
                h("td", { testid: "ref-holders" }, [refWhere(ref)]),
                h("td", {}, [
                  h("span", { cls: `swarm-nb-badge swarm-nb-ref-badge swarm-nb-ref--${state}`, text: text(ref.state, "?") }),
                ]),
              ]);
              tr.dataset.state = state;
              return tr;
            }),
          ),
        ]);
  return h("div", { testid: "resident-data" }, [
    storeUsage(resident.store),
    table,
    omitted
      ? h("div", { cls: "swarm-nb-muted", testid: "refs-more", text: `and ${omitted} more (c.refs_frame() lists every ref)` })
      : null,
  ]);
}

function disconnectedNotice(clicked) {
  const notice = h("div", { cls: "swarm-nb-disconnected", testid: "disconnected" }, [
    h("strong", { text: "Kernel disconnected" }),
    h("div", {
      text:
        "The kernel behind this panel restarted or stopped, so the swarm state it showed is gone " +
        "(no peers, tasks or links are live here).",
    }),
    h("div", { testid: "reconnect-help", text: RECONNECT_HELP }),
    clicked
      ? h("div", {
          cls: "swarm-nb-muted",
          testid: "reinitialize-unavailable",
          text: "Reinitialize needs this panel's kernel, which is gone: use the steps above.",
        })
      : null,
  ]);
  notice.setAttribute("role", "status");
  return notice;
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
    // Set when the kernel side is gone (restart, shutdown): nothing can be sent any more.
    let disconnected = false;
    let reinitializeClicked = false;
    // Kernel clock minus this page's clock, estimated when live data arrives, so bars and
    // samples (kernel timestamps) slide left in real time between updates.
    let clockOffset = 0;

    function liveChanged() {
      const now = Number((model.get("live") || {}).now);
      if (Number.isFinite(now)) clockOffset = now - Date.now() / 1000;
      if (!closed && !disconnected) drawLive();
    }

    function kernelNow() {
      return Date.now() / 1000 + clockOffset;
    }

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

    function markDisconnected() {
      if (disconnected) return;
      disconnected = true;
      scheduleRender();
    }

    function initButton(snapshot) {
      const busy = model.get("busy") === true && !disconnected;
      const button = h("button", {
        cls: "swarm-nb-button",
        testid: "init-button",
        text: busy ? "⏳ Initializing…" : `▶ ${snapshot.initialized ? "Reinitialize" : "Initialize"}`,
      });
      button.type = "button";
      button.disabled = busy;
      button.addEventListener("click", () => {
        if (disconnected) {
          reinitializeClicked = true;
          scheduleRender();
          return;
        }
        button.disabled = true;
        button.textContent = "⏳ Initializing…";
        try {
          model.send({ action: "initialize" });
        } catch (error) {
          // The comm closed under us (kernel restarted before the host told us).
          console.warn("swarm dashboard: cannot reach the kernel", error);
          reinitializeClicked = true;
          markDisconnected();
        }
      });
      return button;
    }

    function renderDisconnected(snapshot) {
      root.dataset.state = "disconnected";
      root.replaceChildren(
        header({ state: "disconnected", primary_metric: "", secondary_metric: "", message: null }),
        disconnectedNotice(reinitializeClicked),
        h("div", { cls: "swarm-nb-footer" }, [initButton(snapshot)]),
      );
    }

    function drawLive() {
      const snapshot = model.get("snapshot") || {};
      const taskStates = list((model.get("states") || {}).task);
      const stream = root.querySelector('[data-testid="task-stream"]');
      if (stream) stream.replaceChildren(taskStream(snapshot.task_stream, kernelNow(), taskStates));
      const spark = root.querySelector('[data-testid="transfer"]');
      const live = model.get("live") || {};
      if (spark) spark.replaceChildren(sparkline(live.transfer_rate, kernelNow()));
    }

    function render() {
      const snapshot = model.get("snapshot") || {};
      if (disconnected) {
        renderDisconnected(snapshot);
        return;
      }
      const status = model.get("status") || {};
      const states = model.get("states") || {};
      const peerStates = list(states.peer);
      const taskStates = list(states.task);
      const refStates = list(states.ref);
      const resident = snapshot.resident_data || {};
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
        section("stream", "Task Stream", h("div", { testid: "task-stream", cls: "swarm-nb-ts" })),
        section("transfer", "Transfer Rate", h("div", { testid: "transfer" })),
        section("tasks", `Tasks in Flight (${list(snapshot.tasks_in_flight).length})`, tasksInFlight(snapshot)),
        section("recent", `Recent Tasks (${list(snapshot.recent_tasks).length})`, recentTasks(snapshot, taskStates)),
        section("resident", `Resident Data (${count(resident.total)})`, residentData(resident, refStates)),
        section("consensus", "Latest Consensus", consensus(snapshot)),
        section("reflections", "Shared Reflections", reflections(snapshot)),
        h("div", { cls: "swarm-nb-footer" }, [
          initButton(snapshot),
          last && last.kind
            ? h("span", { cls: "swarm-nb-muted", text: `Last activity: ${text(last.kind)} ${clock(last.timestamp)}` })
            : null,
        ]),
      );
      drawLive();
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

    // A kernel shut down (not restarted) closes no comm and fires no event: JupyterLab's
    // widget manager then has no live kernel. Hosts without that property are skipped.
    function kernelGone() {
      const manager = model.widget_manager;
      if (!manager || typeof manager !== "object" || !("kernel" in manager)) return false;
      const kernel = manager.kernel;
      return !kernel || kernel.isDisposed === true || kernel.status === "dead";
    }

    liveChanged();
    render();
    const events = ["change:snapshot", "change:status", "change:busy"];
    for (const event of events) model.on(event, scheduleRender);
    // The rates change every second: redraw only the stream and the sparkline for them.
    model.on("change:live", liveChanged);
    // ipywidgets fires this when the kernel restarts (comm_live becomes false); a live comm
    // is only announced while the model is built, before any view, so here it means gone.
    model.on("comm_live_update", markDisconnected);
    // Bars and samples move with time between kernel updates: redraw those two each second.
    const ticker = setInterval(() => {
      if (closed || disconnected) return;
      if (kernelGone()) markDisconnected();
      else drawLive();
    }, 1000);
    return () => {
      closed = true;
      clearInterval(ticker);
      for (const event of events) model.off(event, scheduleRender);
      model.off("comm_live_update", markDisconnected);
      model.off("change:live", liveChanged);
      root.remove();
    };
  },
};
