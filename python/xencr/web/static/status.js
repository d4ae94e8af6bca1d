// xencr status page: keeps the page current without a reload. Every data-refresh seconds it asks
// /api/status (the rows of `xencr status --json`); the age, its bar and the BREACH flag of each
// row are updated in place, and when anything else changed (a new restore point, an outcome, a
// row) the page's <main> is fetched again and swapped. Same origin only; nothing else is loaded.
(function () {
  "use strict";
  var body = document.body;
  var every = Math.max(5, parseInt(body.getAttribute("data-refresh"), 10) || 30) * 1000;
  var live = document.getElementById("live");
  var last = null;

  function duration(s) {
    var out = "", units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    for (var i = 0; i < units.length; i++) {
      if (s >= units[i][1]) { out += Math.floor(s / units[i][1]) + units[i][0]; s %= units[i][1]; }
    }
    return out || "0s";
  }

  function signature(rows) {
    return JSON.stringify(rows.map(function (r) {
      return [r.job, r.vm_uuid, r.target_sr, r.newest, r.last_outcome, r.last_error, r.last_finished,
              r.next_run, r.detached, r.source, r.health_check];
    }));
  }

  function updateRow(r) {
    var tr = document.querySelector('tr[data-key="' + CSS.escape(r.job + "/" + r.vm_uuid + "/" + r.target_sr) + '"]');
    if (!tr) { return; }
    var text = tr.querySelector(".agetext");
    if (text) {
      if (r.age_seconds === null) {
        text.textContent = "no restore point" + (r.rpo_seconds ? " (RPO " + duration(r.rpo_seconds) + ")" : "");
      } else {
        text.textContent = duration(r.age_seconds) + " old" + (r.rpo_seconds ? " of RPO " + duration(r.rpo_seconds) +
          " (" + Math.floor(100 * r.age_seconds / r.rpo_seconds) + "%)" : "");
      }
    }
    var bar = tr.querySelector("svg.rpobar");
    if (bar && r.rpo_seconds) {
      var share = r.age_seconds === null ? 1 : r.age_seconds / r.rpo_seconds;
      bar.setAttribute("class", "rpobar " + (share < 0.75 ? "ok" : share <= 1 ? "warn" : "breach"));
      bar.querySelector(".fill").setAttribute("width", (120 * Math.min(share, 1)).toFixed(1));
    }
    var cell = tr.querySelector("td.age");
    var flag = cell && cell.querySelector(".flag");
    if (r.rpo_breach && cell && !flag) {
      flag = document.createElement("strong");
      flag.className = "flag";
      flag.textContent = "BREACH";
      cell.appendChild(flag);
      tr.className = "breach";
    } else if (!r.rpo_breach && flag) {
      flag.remove();
      tr.className = r.last_outcome || "none";
    }
  }

  function reloadMain() {
    return fetch(window.location.pathname, { headers: { "Accept": "text/html" }, credentials: "same-origin" })
      .then(function (res) { if (!res.ok) { throw new Error("HTTP " + res.status); } return res.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main");
        var open = Array.prototype.map.call(document.querySelectorAll("details[open][id]"), function (d) { return d.id; });
        if (fresh) { document.getElementById("main").innerHTML = fresh.innerHTML; }
        open.forEach(function (id) { var d = document.getElementById(id); if (d) { d.open = true; } });
      });
  }

  function poll() {
    fetch("api/status", { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (res) { if (!res.ok) { throw new Error("HTTP " + res.status); } return res.json(); })
      .then(function (rows) {
        var sig = signature(rows);
        var changed = last !== null && sig !== last;
        last = sig;
        rows.forEach(updateRow);
        return changed ? reloadMain() : null;
      })
      .then(function () {
        live.textContent = "Live: updated " + new Date().toISOString().slice(11, 19) + "Z, every " + (every / 1000) + "s.";
      })
      .catch(function (err) {
        live.textContent = "Live updates paused (" + err.message + "); retrying every " + (every / 1000) + "s.";
      })
      .then(function () { window.setTimeout(poll, every); });
  }

  live.textContent = "Live: updates every " + (every / 1000) + "s.";
  poll();
})();
