// Ktizo admin UI: small progressive enhancements. Every page works without this file; no inline scripts
// anywhere (the Content-Security-Policy forbids them), so behaviour hangs off data attributes and classes.
(function () {
  "use strict";

  // Forms that destroy or release something ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var message = form.getAttribute && form.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  // Selecting devices for bulk actions.
  function rowBoxes() {
    return Array.prototype.slice.call(document.querySelectorAll("input.row-select"));
  }
  function updateSelection() {
    var boxes = rowBoxes();
    var checked = boxes.filter(function (b) { return b.checked; }).length;
    var counter = document.getElementById("selected-count");
    if (counter) counter.textContent = String(checked);
    var all = document.getElementById("select-page");
    if (all) {
      all.checked = boxes.length > 0 && checked === boxes.length;
      all.indeterminate = checked > 0 && checked < boxes.length;
    }
    var panel = document.getElementById("bulk-panel");
    if (panel && checked > 0) panel.open = true;
  }
  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el.id === "select-page") {
      rowBoxes().forEach(function (b) { b.checked = el.checked; });
      updateSelection();
    } else if (el.classList && el.classList.contains("row-select")) {
      updateSelection();
    } else if (el.classList && el.classList.contains("autosubmit") && el.form) {
      el.form.requestSubmit();
    }
  });

  // Relative times ("3 min ago") drift while a page stays open; recompute them from their datetime.
  function ago(date) {
    var seconds = Math.round((Date.now() - date.getTime()) / 1000);
    var future = seconds < 0;
    seconds = Math.abs(seconds);
    if (seconds < 45) return future ? "in a moment" : "just now";
    var units = [[3600, "min", 60], [86400, "h", 3600], [86400 * 60, "d", 86400]];
    for (var i = 0; i < units.length; i++) {
      if (seconds < units[i][0]) {
        var n = Math.max(1, Math.round(seconds / units[i][2]));
        return future ? "in " + n + " " + units[i][1] : n + " " + units[i][1] + " ago";
      }
    }
    return null;
  }
  function refreshTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (t) {
      var text = ago(new Date(t.getAttribute("datetime")));
      if (text) t.textContent = text;
    });
  }
  setInterval(refreshTimes, 30000);

  // Copy a one-time secret (an input) or a command (a <code> block).
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    var text;
    if (typeof source.select === "function") {
      source.select();
      text = source.value;
    } else {
      var range = document.createRange();
      range.selectNodeContents(source);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      text = source.textContent;
    }
    if (navigator.clipboard) {
      navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
    }
  });

  function notice(text) {
    var box = document.getElementById("notice");
    if (!box) return;
    box.textContent = text;
    box.hidden = false;
    clearTimeout(notice.timer);
    notice.timer = setTimeout(function () { box.hidden = true; }, 8000);
  }

  function wireHtmx() {
    if (!window.htmx) return;
    // Polling stops while the tab is in the background: nobody is looking, the server need not answer.
    document.body.addEventListener("htmx:beforeRequest", function (event) {
      if (event.detail.elt && event.detail.elt.id === "poller" && document.hidden) event.preventDefault();
    });
    // An error answer (403, 409, 5xx) leaves the page as it is and says why. Text only, never markup.
    document.body.addEventListener("htmx:responseError", function (event) {
      var xhr = event.detail.xhr;
      if (event.detail.elt && event.detail.elt.id === "poller") return;
      notice((xhr && xhr.responseText ? xhr.responseText : "The request failed") + " (HTTP " + (xhr ? xhr.status : "?") + ")");
    });
    document.body.addEventListener("htmx:sendError", function (event) {
      if (!(event.detail.elt && event.detail.elt.id === "poller")) notice("Ktizo did not answer. Is the server up?");
    });
    // Typing starts a search after a pause and Enter sends one at once: the same query twice within a second is
    // asked once, so the list is not re-drawn under the operator's cursor. Enter later still refreshes.
    var lastSearch = { key: null, at: 0 };
    // (htmx:confirm comes before hx-sync aborts the request in flight; cancelling later would lose both.)
    document.body.addEventListener("htmx:confirm", function (event) {
      var elt = event.detail.elt;
      if (!elt || !elt.matches || !elt.matches("form.search")) return;
      var key = new URLSearchParams(new FormData(elt)).toString();
      var now = Date.now();
      if (key === lastSearch.key && now - lastSearch.at < 1000) {
        event.preventDefault();
        return;
      }
      lastSearch = { key: key, at: now };
    });
    // A search re-draws the whole list, bulk panel included. What the operator opened, ticked or typed there
    // survives the re-draw; a search typed and then sent with Enter (two requests) must not close the panel.
    var kept = null;
    document.body.addEventListener("htmx:beforeSwap", function (event) {
      var panel = document.getElementById("bulk-panel");
      if (!panel || event.detail.target.id !== "device-list") return;
      kept = { open: panel.open, fields: {} };
      panel.querySelectorAll("input[name], select[name]").forEach(function (el) {
        if (el.type === "hidden") return;
        kept.fields[el.name] = el.type === "checkbox" ? el.checked : el.value;
      });
    });
    document.body.addEventListener("htmx:afterSwap", function () {
      var panel = document.getElementById("bulk-panel");
      if (!kept || !panel) return;
      var state = kept;
      kept = null;
      if (state.open) panel.open = true;
      Object.keys(state.fields).forEach(function (name) {
        var el = panel.querySelector("[name='" + name + "']");
        if (!el) return;
        if (el.type === "checkbox") el.checked = el.checked || state.fields[name];
        else if (!el.value) el.value = state.fields[name];
      });
    });
    // A row that arrived by polling but was already drawn (it came in while the page was rendering): keep the
    // one holding an open form, else the one that was there first.
    function extra(a, b) {
      if (a.classList.contains("is-open") !== b.classList.contains("is-open")) {
        return a.classList.contains("is-open") ? b : a;
      }
      return b.classList.contains("is-new") ? b : a;
    }
    document.body.addEventListener("htmx:afterSettle", function () {
      var seen = {};
      document.querySelectorAll("table.devices tbody.device").forEach(function (body) {
        if (seen[body.id]) {
          var gone = extra(seen[body.id], body);
          gone.remove();
          if (gone === seen[body.id]) seen[body.id] = body;
        } else {
          seen[body.id] = body;
        }
      });
      updateSelection();
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { wireHtmx(); updateSelection(); });
  } else {
    wireHtmx();
    updateSelection();
  }
})();
