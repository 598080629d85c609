// Live parts of the console: an element with data-live="/fragment" and data-event="name" is
// re-fetched (with the page's own query string) each time the server's event stream sends that
// event. The HTML comes rendered and escaped by the server; nothing here builds markup.
(function () {
  "use strict";
  var parts = document.querySelectorAll("[data-live]");
  if (!parts.length || !window.EventSource) return;
  var source = new EventSource("/events");
  parts.forEach(function (el) {
    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(el.dataset.live + window.location.search, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("session ended"); }
          return r.ok ? r.text() : Promise.reject(new Error(r.status));
        })
        .then(function (html) { el.innerHTML = html; el.dispatchEvent(new CustomEvent("refreshed")); })
        .catch(function () {})
        .finally(function () { busy = false; if (again) { again = false; refresh(); } });
    }
    source.addEventListener(el.dataset.event, refresh);
    // (Re)connected: whatever changed while the stream was down is fetched once.
    source.addEventListener("open", refresh);
  });
})();
