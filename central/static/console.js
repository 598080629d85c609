// The console's live desk. An element with data-live="/fragment" and data-event="name" is
// re-fetched (with the page's own query string) each time the server's event stream sends that
// event; the HTML comes rendered and escaped by the server, nothing here builds markup from data.
// The stream's "desk" event carries counts and the newest pending sighting's id: the header and
// the tab title follow it, and a new sighting sounds (if this operator turned sound on in this
// browser) and shows a desktop notification (if allowed). "ended" means the session ended.
(function () {
  "use strict";
  var desk = (window.checkpointDesk = { alerts: [] }); // what was played and shown, for tests and curiosity
  var body = document.body;
  var user = body.dataset.user || "";
  var baseTitle = document.title;

  // Local time beside UTC: the site's when its unit stated its zone (the server writes it), else the
  // browser's own, said to be the browser's.
  function localTimes(root) {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local";
    root.querySelectorAll("time.when[datetime]").forEach(function (t) {
      if (t.querySelector(".local, .site")) return;
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d.getTime())) return;
      var span = document.createElement("span");
      span.className = "local";
      // sv-SE writes YYYY-MM-DD HH:MM:SS, as the server writes UTC and the site's time.
      span.textContent = " · " + d.toLocaleString("sv-SE", { hour12: false }) + " " + zone + " (your browser's zone)";
      t.appendChild(span);
    });
  }
  localTimes(document);

  if (!user || !window.EventSource) return;

  // --- sound: per operator, kept in this browser --------------------------------------------
  var soundKey = "checkpoint.sound." + user, notifyKey = "checkpoint.notify." + user;
  var audio = null;
  var soundBtn = document.getElementById("sound-toggle");
  function soundOn() { return localStorage.getItem(soundKey) === "on"; }
  function showSound() {
    if (!soundBtn) return;
    soundBtn.textContent = soundOn() ? "Sound on" : "Sound off";
    soundBtn.setAttribute("aria-pressed", soundOn() ? "true" : "false");
  }
  function ensureAudio() {
    // Browsers start audio only after a click on the page: the switch (or any click) unlocks it.
    if (!audio && (window.AudioContext || window.webkitAudioContext)) {
      audio = new (window.AudioContext || window.webkitAudioContext)();
    }
    if (audio && audio.state === "suspended") audio.resume();
  }
  function beep(urgent) {
    if (!soundOn()) return;
    ensureAudio();
    if (!audio) return;
    // Urgent (priority 7-9): three louder, higher beeps; otherwise two soft ones.
    var n = urgent ? 3 : 2, gainLevel = urgent ? 0.9 : 0.3, freq = urgent ? 1180 : 740;
    for (var i = 0; i < n; i++) {
      var osc = audio.createOscillator(), gain = audio.createGain();
      var start = audio.currentTime + i * 0.22;
      osc.frequency.value = freq;
      gain.gain.value = gainLevel;
      osc.connect(gain).connect(audio.destination);
      if (i === n - 1) {
        osc.onended = function () {
          desk.alerts.push({ kind: "sound", urgent: !!urgent, gain: gainLevel, state: audio.state });
        };
      }
      osc.start(start);
      osc.stop(start + 0.15);
    }
  }
  if (soundBtn) {
    showSound();
    soundBtn.addEventListener("click", function () {
      localStorage.setItem(soundKey, soundOn() ? "off" : "on");
      showSound();
      if (soundOn()) ensureAudio();
    });
  }
  document.addEventListener("click", function () { if (soundOn()) ensureAudio(); });

  // --- desktop notifications ------------------------------------------------------------------
  var notifyBtn = document.getElementById("notify-toggle");
  function notifyOn() {
    return window.Notification && Notification.permission === "granted" && localStorage.getItem(notifyKey) === "on";
  }
  function showNotify() {
    if (!notifyBtn) return;
    if (!window.Notification) { notifyBtn.hidden = true; return; }
    notifyBtn.textContent = notifyOn() ? "Desktop alerts on" : "Desktop alerts off";
    notifyBtn.setAttribute("aria-pressed", notifyOn() ? "true" : "false");
  }
  if (notifyBtn) {
    showNotify();
    notifyBtn.addEventListener("click", function () {
      if (notifyOn()) { localStorage.setItem(notifyKey, "off"); showNotify(); return; }
      Notification.requestPermission().then(function (p) {
        localStorage.setItem(notifyKey, p === "granted" ? "on" : "off");
        showNotify();
      });
    });
  }
  function notify(d) {
    if (!notifyOn()) return;
    // No name or face on the desktop: only that something waits.
    var n = new Notification("checkpoint: new sighting" + (d.urgent ? " (urgent)" : ""), {
      body: d.pending + " waiting for a decision", tag: "checkpoint-desk", requireInteraction: !!d.urgent,
    });
    n.onclick = function () { window.focus(); window.location.href = "/hits?state=pending"; };
    desk.alerts.push({ kind: "notification", urgent: !!d.urgent });
  }

  // --- the desk line and the title --------------------------------------------------------------
  // A sighting is new when the newest pending one arrived later than any seen so far: a decision
  // that leaves an older one newest sounds nothing.
  var newestAt = parseFloat(body.dataset.newestAt || "0") || 0;
  function showDesk(d) {
    var count = document.getElementById("pending-count");
    if (count) count.textContent = d.pending;
    var late = document.getElementById("overdue-count"), lateBox = document.getElementById("overdue");
    if (late) late.textContent = d.overdue;
    if (lateBox) lateBox.hidden = !d.overdue;
    var link = document.getElementById("desk");
    if (link) link.classList.toggle("late", d.overdue > 0);
    document.title = (d.pending ? "(" + d.pending + (d.overdue ? "!" : "") + ") " : "") + baseTitle;
    body.dataset.pending = d.pending;
    if (d.newest && d.newest_at > newestAt) {
      newestAt = d.newest_at;
      beep(d.urgent);
      notify(d);
    }
  }

  var source = new EventSource("/events");
  source.addEventListener("desk", function (e) {
    try { showDesk(JSON.parse(e.data)); } catch (err) { /* a malformed event changes nothing */ }
  });
  source.addEventListener("ended", function () {
    source.close();
    window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
  });

  document.querySelectorAll("[data-live]").forEach(function (el) {
    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(el.dataset.live + window.location.search, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("session ended"); }
          return r.ok ? r.text() : Promise.reject(new Error(r.status));
        })
        .then(function (html) {
          el.innerHTML = html;
          localTimes(el);
          el.dispatchEvent(new CustomEvent("refreshed"));
        })
        .catch(function () {})
        .finally(function () { busy = false; if (again) { again = false; refresh(); } });
    }
    source.addEventListener(el.dataset.event, refresh);
    // (Re)connected: whatever changed while the stream was down is fetched once.
    source.addEventListener("open", refresh);
  });
})();
