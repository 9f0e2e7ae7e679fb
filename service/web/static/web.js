// lbgat pages: live updates and in-place sorting. Everything here is an enhancement; the pages
// render their content without it. No dependencies, no build step; data comes from data-* attributes.
"use strict";

(function () {
  function $(selector, root) { return (root || document).querySelector(selector); }

  function showLive(on) {
    document.querySelectorAll("[data-live-status]").forEach(function (el) { el.hidden = !on; });
  }

  // Coalesce bursts of events into one refresh.
  function debounce(fn, ms) {
    var timer = null;
    return function () {
      if (timer) clearTimeout(timer);
      timer = setTimeout(function () { timer = null; fn(); }, ms);
    };
  }

  function fetchHtml(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } }).then(function (r) {
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.text();
    });
  }

  function setState(el, state) {
    el.className = "state state-" + state;
    el.dataset.state = state;
    el.textContent = state;
  }

  // -- queue: state events of the team's jobs; the tables are re-rendered by the server ----------------
  function queuePage(box) {
    var reload = debounce(function () {
      fetchHtml(box.dataset.queueTable).then(function (html) {
        box.innerHTML = html;
        attachConfirm(box);
      }).catch(function () { /* the next event tries again */ });
    }, 250);
    var source = new EventSource(box.dataset.queueLive);
    source.onopen = function () { showLive(true); };
    source.onerror = function () { showLive(false); };
    source.addEventListener("state", function (e) {
      var data = JSON.parse(e.data);
      var row = box.querySelector('tr[data-experiment="' + data.experiment + '"] .state');
      if (row && data.to) setState(row, data.to);
      reload();
    });
    source.addEventListener("moved", reload);
  }

  // -- one experiment: state, metrics, the log ---------------------------------------------------------
  function experimentPage(box) {
    var badge = $(".summary .state", box);
    var history = $("#history tbody", box);
    var logBox = $("#log", box);
    var following = false;
    var redraw = debounce(function () {
      fetchHtml(box.dataset.curves).then(function (html) { $("#curves", box).innerHTML = html; }).catch(function () {});
    }, 300);

    function followLog() {
      if (following || !box.dataset.log || !logBox || !window.ReadableStream) return;
      following = true;
      fetch(box.dataset.log, { credentials: "same-origin" }).then(function (r) {
        if (!r.ok || !r.body) return;
        var reader = r.body.getReader();
        var decoder = new TextDecoder();
        var text = "";
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) return;
            text += decoder.decode(chunk.value, { stream: true });
            var lines = text.split("\n");
            if (lines.length > 400) { lines = lines.slice(-400); text = lines.join("\n"); }
            logBox.textContent = text;
            logBox.scrollTop = logBox.scrollHeight;
            return pump();
          });
        }
        return pump();
      }).catch(function () { following = false; });
    }

    if (badge && (badge.dataset.state === "running" || badge.dataset.state === "dispatching")) followLog();

    var source = new EventSource(box.dataset.live);
    source.onopen = function () { showLive(true); };
    source.onerror = function () { showLive(false); };
    source.addEventListener("state", function (e) {
      var data = JSON.parse(e.data);
      if (badge && data.to) setState(badge, data.to);
      if (history && data.to) {
        var tr = document.createElement("tr");
        [data.at ? data.at.replace("T", " ").slice(0, 19) + " UTC" : "", data.from || "–", data.to, data.reason || ""].forEach(function (v, i) {
          var td = document.createElement("td");
          if (i === 2) { var s = document.createElement("span"); setState(s, v); td.appendChild(s); } else { td.textContent = v; }
          tr.appendChild(td);
        });
        history.appendChild(tr);
      }
      var info = $("[data-queue-info]", box);
      if (info && data.to !== "queued" && data.to !== "retrying") info.hidden = true;
      if (data.to === "running" || data.to === "dispatching") followLog();
    });
    source.addEventListener("metric", redraw);
    source.addEventListener("end", function () {
      source.close();
      showLive(false);
      // the finished page has the results, artifacts and the whole log: load it once
      setTimeout(function () { window.location.reload(); }, 300);
    });
  }

  // -- tables: sort in place by a heading (the links still sort on the server without JS) --------------
  function sortable(table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, index) {
      var link = th.querySelector("a");
      if (!link) return;
      link.addEventListener("click", function (ev) {
        ev.preventDefault();
        var desc = th.getAttribute("aria-sort") !== "descending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", desc ? "descending" : "ascending");
        function key(row) {
          var cell = row.cells[index];
          var raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
          var n = parseFloat(raw);
          return raw === "" || raw === "–" ? null : (isNaN(n) || cell.dataset.sort === undefined && !/^[-\d.]/.test(raw) ? raw.toLowerCase() : n);
        }
        function order(a, b) {
          var x = key(a), y = key(b);
          if (x === null) return y === null ? 0 : 1;
          if (y === null) return -1;
          if (x < y) return desc ? 1 : -1;
          if (x > y) return desc ? -1 : 1;
          return 0;
        }
        // each <tbody> apart, as the server sorts: a protocol's board keeps its partial rows in a
        // body of their own, below the full ones, and a heading never mixes the two
        Array.prototype.forEach.call(table.tBodies, function (body) {
          var rows = Array.prototype.slice.call(body.rows).filter(function (r) { return r.cells.length === heads.length; });
          rows.sort(order);
          rows.forEach(function (r) { body.appendChild(r); });
        });
        history.replaceState(null, "", link.href);
      });
    });
  }

  function attachConfirm(root) {
    (root || document).querySelectorAll("button[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function (ev) {
        if (!window.confirm(button.dataset.confirm)) ev.preventDefault();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var queue = document.querySelector("[data-queue-live]");
    if (queue && window.EventSource) queuePage(queue);
    var exp = document.querySelector("#experiment[data-live]");
    if (exp && window.EventSource) experimentPage(exp);
    document.querySelectorAll("table.sortable").forEach(sortable);
    attachConfirm(document);
  });
})();
