// Progressive enhancement for the build board: copy buttons, and fresh rows every few seconds.
// The page works without this file (a <noscript> refresh stands in for the polling).
(function () {
  "use strict";

  function copyText(text, button) {
    function done(ok) {
      button.textContent = ok ? "copied" : "select and copy";
      window.setTimeout(function () { button.textContent = "copy"; }, 1500);
    }
    function fallback() {
      // Plain-HTTP pages have no async clipboard; a selection plus execCommand still works.
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  }

  function addCopyButtons(root) {
    root.querySelectorAll("code[data-copy]").forEach(function (code) {
      if (code.nextElementSibling && code.nextElementSibling.classList.contains("copy")) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "copy";
      button.textContent = "copy";
      button.title = "copy " + code.dataset.copy;
      button.addEventListener("click", function () { copyText(code.dataset.copy, button); });
      code.insertAdjacentElement("afterend", button);
    });
  }

  function openDetails(root) {
    var state = {};
    root.querySelectorAll("details[data-job-id]").forEach(function (d) {
      state[d.dataset.jobId] = d.open;
    });
    return state;
  }

  function poll(live) {
    var seconds = parseInt(live.dataset.refresh || "3", 10) * 1000;
    var busy = false;
    function refresh() {
      if (busy || document.visibilityState !== "visible") return;
      busy = true;
      var url = new URL(window.location.href);
      url.searchParams.set("partial", "1");
      fetch(url.toString(), { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (response.status === 401 || response.redirected) {
            window.location.reload();
            return null;
          }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html === null || html === undefined) return;
          var before = openDetails(live);
          live.innerHTML = html;
          live.querySelectorAll("details[data-job-id]").forEach(function (d) {
            if (Object.prototype.hasOwnProperty.call(before, d.dataset.jobId)) {
              d.open = before[d.dataset.jobId];
            }
          });
          addCopyButtons(live);
        })
        .catch(function () { /* the service may be restarting: try again next tick */ })
        .then(function () { busy = false; });
    }
    window.setInterval(refresh, seconds);
  }

  document.addEventListener("DOMContentLoaded", function () {
    addCopyButtons(document);
    var live = document.getElementById("live");
    if (live) poll(live);
  });
})();
