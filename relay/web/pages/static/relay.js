// relay status page: the few lines of script it has. The pages work without them; this
// refreshes parts marked data-live in place (the overview), pausing while the tab is hidden.
"use strict";
(function () {
  function pad(n) { return String(n).padStart(2, "0"); }
  function stamp(d) {
    return d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate()) +
      " " + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" + pad(d.getUTCSeconds()) + " UTC";
  }
  function live(box) {
    var every = Math.max(2, Number(box.dataset.every) || 5) * 1000;
    var status = document.getElementById("live-status");
    var busy = false;
    function say(text) { if (status) { status.textContent = text; } }
    async function refresh() {
      if (busy || document.hidden) { return; }
      busy = true;
      try {
        var response = await fetch(box.dataset.live, {
          credentials: "same-origin", headers: { "Accept": "text/html" }, cache: "no-store"
        });
        if (response.redirected || response.status === 401 || response.status === 403) {
          say("Session ended: reload the page to log in again.");
          clearInterval(timer);
          return;
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        box.innerHTML = await response.text();
        say("Updated " + stamp(new Date()) + " · refreshes every " + every / 1000 + " s");
      } catch (err) {
        say("Could not refresh (" + err.message + "); trying again.");
      } finally {
        busy = false;
      }
    }
    var timer = setInterval(refresh, every);
    document.addEventListener("visibilitychange", refresh);
  }
  document.querySelectorAll("[data-live]").forEach(live);
})();
