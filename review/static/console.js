// modstream review console: keyboard shortcuts, image reveal, meters, and the claim heartbeat.
// Loaded as a static file (the CSP forbids inline script); the page works without it, only
// slower, but then the claim lapses after the claim timeout like an abandoned one.
(function () {
  "use strict";
  const ACTION_KEYS = { c: "confirm", x: "correct", n: "not_violating", s: "skip", e: "escalate" };

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function setupMeters() {
    $all(".meter-fill[data-width]").forEach(function (el) {
      const pct = Math.max(0, Math.min(100, Number(el.getAttribute("data-width")) || 0));
      el.style.width = pct + "%";  // CSSOM from a script file is allowed by the CSP
    });
  }

  function setupReveal() {
    const media = $("#media");
    const button = $("#reveal");
    if (!media || !button) return null;
    function toggle() {
      const reveal = media.classList.contains("concealed");
      media.classList.toggle("concealed", !reveal);
      media.classList.toggle("revealed", reveal);
      button.setAttribute("aria-pressed", reveal ? "true" : "false");
      button.firstChild.textContent = reveal ? "Hide image " : "Reveal image ";
    }
    button.addEventListener("click", toggle);
    const img = $("#post-image");
    if (img) {
      img.addEventListener("error", function () {
        media.classList.add("unavailable");
        const note = $(".media-note");
        if (note) note.textContent = "The image could not be fetched or decoded now. Review the text, or skip.";
      });
    }
    return toggle;
  }

  function setupDecisions(toggleReveal) {
    const form = $("#decision-form");
    const tasks = form ? $all("fieldset.task", form) : [];
    let active = 0;
    let locked = false;

    // The claim is gone (or the session): nothing entered here could be saved, so say so and
    // make the form inert instead of letting the reviewer work on a dead item.
    function lock(bannerId) {
      if (locked || !form) return;
      locked = true;
      form.classList.add("locked");
      form.setAttribute("aria-disabled", "true");
      $all("input, select, textarea, button", form).forEach(function (el) { el.disabled = true; });
      const banner = document.getElementById(bannerId);
      if (banner) {
        banner.hidden = false;
        const link = $("a", banner);
        if (link) link.focus();
      }
    }

    function activate(i) {
      if (!tasks.length) return;
      active = (i + tasks.length) % tasks.length;
      tasks.forEach(function (t, j) { t.classList.toggle("active", j === active); });
      tasks[active].scrollIntoView({ block: "nearest" });
    }
    function decided(t) { return !!$("input[type=radio]:checked", t); }
    function nextUndecided() {
      for (let k = 1; k <= tasks.length; k++) {
        const j = (active + k) % tasks.length;
        if (!decided(tasks[j])) { activate(j); return; }
      }
    }
    function choose(t, action) {
      const radio = $('input[type=radio][value="' + action + '"]', t);
      if (!radio) return;
      if (action === "correct") {
        const select = $("select", t);
        if (select && radio.checked) {  // pressed again: cycle the corrected label
          select.selectedIndex = (select.selectedIndex + 1) % select.options.length;
        }
      }
      radio.checked = true;
      t.classList.remove("missing");
    }
    function submit() {
      const missing = tasks.filter(function (t) { return !decided(t); });
      tasks.forEach(function (t) { t.classList.toggle("missing", missing.indexOf(t) >= 0); });
      if (missing.length) { activate(tasks.indexOf(missing[0])); return; }
      form.requestSubmit();
    }
    tasks.forEach(function (t, j) {
      t.addEventListener("click", function () { activate(j); });
      t.addEventListener("change", function () { t.classList.remove("missing"); });
    });
    if (form) {
      form.addEventListener("submit", function (ev) {
        if (locked) { ev.preventDefault(); return; }
        if (tasks.some(function (t) { return !decided(t); })) { ev.preventDefault(); submit(); }
      });
    }

    document.addEventListener("keydown", function (ev) {
      if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
      const tag = (ev.target && ev.target.tagName) || "";
      if (tag === "TEXTAREA" || tag === "INPUT" && ev.target.type !== "radio" || tag === "SELECT") {
        if (ev.key === "Escape") ev.target.blur();
        return;
      }
      const key = ev.key;
      if (key === "?") { const d = $("#shortcuts"); if (d) d.open = !d.open; ev.preventDefault(); return; }
      if (key === "r" && $("#queue-empty")) { window.location.assign("/review"); return; }
      if (!tasks.length) return;
      if (key === "v" && toggleReveal) { toggleReveal(); ev.preventDefault(); return; }
      if (locked) return;
      if (key === "j" || key === "ArrowDown") { activate(active + 1); ev.preventDefault(); return; }
      if (key === "k" || key === "ArrowUp") { activate(active - 1); ev.preventDefault(); return; }
      if (/^[1-9]$/.test(key) && Number(key) <= tasks.length) { activate(Number(key) - 1); ev.preventDefault(); return; }
      if (key === "Enter") { submit(); ev.preventDefault(); return; }
      if (key === "a") {
        tasks.forEach(function (t) { if (!decided(t)) choose(t, "confirm"); });
        ev.preventDefault();
        return;
      }
      if (key === "m" || key === "u") {  // the image-text answer; the same key again clears it
        const value = key === "m" ? "match" : "mismatch";
        const radio = $("#pair input[value=" + value + "]");
        if (radio) {
          const clear = $("#pair input[value='']");
          (radio.checked && clear ? clear : radio).checked = true;
          ev.preventDefault();
        }
        return;
      }
      const action = ACTION_KEYS[key];
      if (action) {
        const t = tasks[active];
        const again = action === "correct" && $("select", t) && decided(t) &&
          $("input[type=radio]:checked", t).value === "correct";
        choose(t, action);
        if (!again) nextUndecided();
        ev.preventDefault();
      }
    });
    return lock;
  }

  // Renews the claim every claim_timeout/3 while the page is open (the server passes the
  // interval): 200 keeps it, 409 means it was reassigned or closed, 401/403 that the session
  // (or this page's CSRF token) is gone. Anything else is transient: warn and keep trying.
  function setupHeartbeat(lock) {
    const form = $("#decision-form");
    if (!form || !window.fetch) return;
    const url = form.getAttribute("data-renew-url");
    const every = Number(form.getAttribute("data-renew-ms")) || 0;
    const tokenInput = $("input[name=csrf_token]", form);
    if (!url || every <= 0 || !tokenInput) return;
    const token = tokenInput.value;
    const warning = $("#renew-warning");
    let timer = null;
    let inFlight = false;
    let submitted = false;  // leaving with a decision: a late answer must not lock the form

    function stop() { if (timer !== null) { clearInterval(timer); timer = null; } }
    function warn(on) { if (warning) warning.hidden = !on; }
    function beat() {
      if (inFlight || timer === null) return;
      inFlight = true;
      fetch(url, { method: "POST", headers: { "X-CSRF-Token": token }, credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (submitted || r.ok) { warn(false); return; }
          if (r.status === 409) { stop(); warn(false); lock("claim-lost"); return; }
          if (r.status === 401 || r.status === 403) { stop(); warn(false); lock("session-lost"); return; }
          warn(true);
        })
        .catch(function () { warn(true); })
        .then(function () { inFlight = false; });
    }
    timer = setInterval(beat, every);
    form.addEventListener("submit", function (ev) { if (!ev.defaultPrevented) { submitted = true; stop(); } });
    // Background tabs run timers late: renew (or find out) as soon as the page is seen again.
    document.addEventListener("visibilitychange", function () { if (!document.hidden) beat(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupMeters();
    const lock = setupDecisions(setupReveal());
    setupHeartbeat(lock);
  });
})();
