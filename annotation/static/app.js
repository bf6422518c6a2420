// Ranking widget for the task page. No inline script: the CSP forbids it.
// The list order is the ranking, best first; data-tie="1" on a card ties it with the card above.
// In a top-m project (data-rank-top) only the first `ranked` cards are ranked: a divider
// follows them and the cards below it are sent as `below`, the unordered rest.
// A ranking in progress is kept as a draft in sessionStorage, so a reload or a visit elsewhere
// in the same tab does not lose it; a failed request says in plain words what was and was not
// stored, and offers a way on.
(function () {
  "use strict";
  var task = document.getElementById("task");
  if (!task) return;
  var list = document.getElementById("ranking");
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var taskId = task.dataset.taskId;
  var project = task.dataset.project;
  var status = task.dataset.status;
  var revising = status === "done";
  var started = Date.now();
  var changed = false;  // the order was changed (an unchanged one is confirmed before it is sent)
  var busy = false;
  var stored = null;  // "ranked" or "skipped" once the server has it: all that is left is the next task
  var divider = document.getElementById("below-divider");
  // How many cards the ranking orders: the project's m, or as many as a stored ranking did.
  var ranked = divider ? (parseInt(task.dataset.ranked, 10) || parseInt(task.dataset.rankTop, 10)) : Infinity;

  function cards() { return Array.prototype.slice.call(list.querySelectorAll("li.cand")); }
  function say(text, isError) {
    var m = document.getElementById("message");
    m.textContent = text;
    m.className = isError ? "error" : "";
  }

  function isBelow(card) { return cards().indexOf(card) >= ranked; }

  function relabel() {
    var rank = 0;
    var all = cards();
    all.forEach(function (c, i) {
      var below = i >= ranked;
      if (i === 0 || below) c.dataset.tie = "0";  // nothing ties across the line or below it
      if (i > 0 && c.dataset.tie !== "1") rank++;
      var tied = c.dataset.tie === "1";
      c.classList.toggle("below", below);
      c.querySelector(".rank-label").textContent = below ? "–" : "#" + (rank + 1) + (rank === 0 ? " best" : "");
      c.querySelector(".tie-label").hidden = !tied;
      c.classList.toggle("tied", tied);
      c.setAttribute("aria-label", below ? "Unranked response, below the line"
                                         : "Response at rank " + (rank + 1) + (tied ? ", tied with the one above" : ""));
    });
    if (divider) list.insertBefore(divider, all[ranked] || null);
  }

  function markChanged() { changed = true; document.getElementById("confirm").hidden = true; relabel(); keepDraft(); }

  // --- the draft: order, ties, "all bad" and rationale, per task, for this tab only.
  // It belongs to the page as the server showed it: the task open for its first ranking (its
  // lease live or lapsed, which can still be submitted) or one revision of a ranked task. A
  // draft of another stage (the task was ranked meanwhile, in another tab) or of other
  // candidates is dropped, never applied.
  var draftKey = "align-draft:" + taskId;
  var stage = revising ? "revision " + task.dataset.revision
                       : (status === "leased" || status === "expired") ? "open" : status;
  function cardIds() { return cards().map(function (c) { return c.dataset.id; }); }
  function keepDraft() {
    if (stored) return;
    try {
      window.sessionStorage.setItem(draftKey, JSON.stringify({
        task: taskId, stage: stage, list: cardIds(),
        ties: cards().filter(function (c) { return c.dataset.tie === "1"; }).map(function (c) { return c.dataset.id; }),
        changed: changed, allBad: document.getElementById("all-bad").checked,
        rationale: document.getElementById("rationale").value, spentMs: Date.now() - started
      }));
    } catch (e) { /* storage full or turned off: the page works on, without a draft */ }
  }
  function dropDraft() {
    try { window.sessionStorage.removeItem(draftKey); } catch (e) { /* nothing kept */ }
  }
  function restoreDraft() {
    var d = null;
    try { d = JSON.parse(window.sessionStorage.getItem(draftKey)); } catch (e) { d = null; }
    if (!d) return;
    var byId = {};
    cards().forEach(function (c) { byId[c.dataset.id] = c; });
    var fits = d.task === taskId && d.stage === stage && Array.isArray(d.list) && Array.isArray(d.ties) &&
               d.list.slice().sort().join(",") === Object.keys(byId).sort().join(",");
    if (!fits) { dropDraft(); return; }
    d.list.forEach(function (id) {
      byId[id].dataset.tie = d.ties.indexOf(id) >= 0 ? "1" : "0";
      list.appendChild(byId[id]);  // relabel() puts the top-m line back after the ranked cards
    });
    document.getElementById("all-bad").checked = d.allBad === true;
    document.getElementById("rationale").value = typeof d.rationale === "string" ? d.rationale : "";
    changed = d.changed === true;
    if (typeof d.spentMs === "number" && d.spentMs > 0) started = Date.now() - d.spentMs;
    say("Your ranking in progress was restored; it is not submitted yet.");
  }

  // Moving a card breaks the ties it took part in, so a tie always means what it shows.
  function breakTiesAround(card) {
    var next = card.nextElementSibling;
    if (next && next.dataset.tie === "1") next.dataset.tie = "0";
    card.dataset.tie = "0";
  }

  function moveTo(card, index) {
    var all = cards();
    index = Math.max(0, Math.min(all.length - 1, index));
    if (all.indexOf(card) === index) return;
    breakTiesAround(card);
    var others = all.filter(function (c) { return c !== card; });
    list.insertBefore(card, others[index] || null);
    breakTiesAround(card);
    markChanged();
    card.focus();
  }

  function toggleTie(card) {
    if (!card.previousElementSibling) { say("The first response has nothing above it to tie with.", true); return; }
    if (isBelow(card)) { say("Responses below the line are not ranked; move it above the line to rank it.", true); return; }
    card.dataset.tie = card.dataset.tie === "1" ? "0" : "1";
    markChanged();
    say(card.dataset.tie === "1" ? "Tied with the response above." : "Tie removed.");
  }

  function order() {
    var groups = [];
    cards().slice(0, ranked).forEach(function (c) {
      var id = parseInt(c.dataset.id, 10);
      if (c.dataset.tie === "1" && groups.length) groups[groups.length - 1].push(id);
      else groups.push([id]);
    });
    return groups;
  }

  function below() {
    var rest = cards().slice(ranked).map(function (c) { return parseInt(c.dataset.id, 10); });
    return rest.length ? rest : null;
  }

  // --- buttons
  list.addEventListener("click", function (ev) {
    var card = ev.target.closest("li.cand");
    if (!card) return;
    var idx = cards().indexOf(card);
    if (ev.target.closest(".mv-up")) moveTo(card, idx - 1);
    else if (ev.target.closest(".mv-down")) moveTo(card, idx + 1);
    else if (ev.target.closest(".tie")) toggleTie(card);
  });

  // --- keyboard: arrows move, digits place, t ties, Enter submits
  list.addEventListener("keydown", function (ev) {
    var card = document.activeElement && document.activeElement.closest && document.activeElement.closest("li.cand");
    if (!card || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    if (ev.target.tagName === "BUTTON" && (ev.key === "Enter" || ev.key === " ")) return;
    var idx = cards().indexOf(card);
    if (ev.key === "ArrowUp") { ev.preventDefault(); moveTo(card, idx - 1); }
    else if (ev.key === "ArrowDown") { ev.preventDefault(); moveTo(card, idx + 1); }
    else if (/^[1-9]$/.test(ev.key)) { ev.preventDefault(); moveTo(card, parseInt(ev.key, 10) - 1); }
    else if (ev.key === "t" || ev.key === "T") { ev.preventDefault(); toggleTie(card); }
    else if (ev.key === "Enter") { ev.preventDefault(); submit(false); }
  });

  // --- drag and drop with pointer events (mouse, pen and touch alike)
  // A press on the handle that never moves the card (a click) changes nothing: the ties the
  // card takes part in break only once it leaves its place, and at the place it is dropped.
  var dragging = null;
  var dragMoved = false;
  list.addEventListener("pointerdown", function (ev) {
    var handle = ev.target.closest(".handle");
    if (!handle || ev.button !== 0) return;
    dragging = handle.closest("li.cand");
    dragMoved = false;
    dragging.classList.add("dragging");
    ev.preventDefault();
  });
  document.addEventListener("pointermove", function (ev) {
    if (!dragging) return;
    var y = ev.clientY;
    var before = null;
    cards().some(function (c) {
      if (c === dragging) return false;
      var r = c.getBoundingClientRect();
      if (y < r.top + r.height / 2) { before = c; return true; }
      return false;
    });
    var all = cards();
    var now = all[all.indexOf(dragging) + 1] || null;  // the card after it (the divider is not one)
    if (before !== now) {
      if (!dragMoved) breakTiesAround(dragging);  // it leaves its place: untie it from its neighbours there
      dragMoved = true;
      list.insertBefore(dragging, before);
      markChanged();
    }
  });
  function endDrag() {
    if (!dragging) return;
    if (dragMoved) breakTiesAround(dragging);
    dragging.classList.remove("dragging");
    dragging.focus();
    dragging = null;
    relabel();
    keepDraft();
  }
  document.addEventListener("pointerup", endDrag);
  document.addEventListener("pointercancel", endDrag);

  // --- submit, skip, next task
  // A 503 is a busy server that stored nothing: the request is sent again after the
  // Retry-After it names, a few times, before the annotator is told.
  // A 403 may be a CSRF token of an earlier session: after signing in again (in another tab)
  // the page's token no longer matches. The request is sent once more with the current token,
  // read from this task's page (same origin: no other site can read it); a 403 for any other
  // reason comes back as it was, the token being the same.
  function api(method, url, body, triesLeft, renewed) {
    if (triesLeft === undefined) triesLeft = 3;
    return fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (resp) {
      if (resp.status === 403 && !renewed) {
        return currentToken().then(function (token) {
          if (!token || token === csrf) return resp;
          useToken(token);
          return api(method, url, body, triesLeft, true);
        });
      }
      if (resp.status !== 503 || triesLeft <= 0) return resp;
      var wait = Math.min(10, parseInt(resp.headers.get("Retry-After"), 10) || 1);
      say("The server is busy; trying again in " + wait + " s…");
      return new Promise(function (done) { window.setTimeout(done, wait * 1000); })
        .then(function () { return api(method, url, body, triesLeft - 1, renewed); });
    });
  }
  function currentToken() {
    return fetch("/tasks/" + encodeURIComponent(taskId), {
      credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" }
    }).then(function (resp) { return resp.ok ? resp.text() : ""; }).then(function (html) {
      var meta = html && new DOMParser().parseFromString(html, "text/html").querySelector('meta[name="csrf-token"]');
      return meta ? meta.content : "";
    }).catch(function () { return ""; });
  }
  function useToken(token) {
    csrf = token;  // and the page's forms (Sign out) send it too
    Array.prototype.forEach.call(document.querySelectorAll('input[name="csrf_token"]'), function (i) { i.value = token; });
  }
  // A refused request's answer: the server's words, and the code of the few refusals the page
  // answers in its own way ("code" in the JSON: already_ranked, already_skipped, lease_expired,
  // csrf_token), so that no message's wording is read.
  function refusal(resp) {
    return resp.json().then(function (j) { return { text: j.detail || resp.statusText, code: j.code || null }; },
                            function () { return { text: resp.statusText, code: null }; });
  }

  // The ways on after a failure, under the message: the next task, this page again (with what
  // the server has now), a tab to sign in again.
  function offer(which, reloadLabel) {
    var first = null;
    ["next-task", "reload-task", "sign-in"].forEach(function (id) {
      var el = document.getElementById(id);
      el.hidden = which.indexOf(id) < 0;
      if (!el.hidden && !first) first = el;
    });
    if (reloadLabel) document.getElementById("reload-task").textContent = reloadLabel;
    document.getElementById("way-on").hidden = !first;
    if (first) first.focus();
  }

  var SESSION_ENDED = "Your session has ended: sign in again (in another tab); your ranking is kept on this page.";

  // Stored: the page only leads on from here; submitting or skipping again would be refused.
  function isStored(what) {
    stored = what;
    dropDraft();
    ["submit", "confirm-yes", "skip"].forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.disabled = true;
    });
  }

  function goNext() {
    busy = true;
    return api("POST", "/api/projects/" + encodeURIComponent(project) + "/next").then(function (resp) {
      if (resp.status === 204) { window.location.assign("/projects/" + encodeURIComponent(project) + "/done"); return; }
      if (resp.ok) return resp.json().then(function (t) { window.location.assign("/tasks/" + t.id); });
      return refusal(resp).then(function (why) {
        if (resp.status === 401) nextFailed("your session has ended: sign in again in another tab", ["next-task", "sign-in"]);
        else nextFailed(why.text, ["next-task"]);
      });
    }).catch(function () { nextFailed("network error", ["next-task"]); });
  }
  function nextFailed(why, ways) {
    var done = stored === "ranked" ? "Your ranking was saved, but the next task did not open"
             : stored === "skipped" ? "Skipped, but the next task did not open" : "The next task did not open";
    say(done + " (" + why + "). Try again:", true);
    offer(ways);
    busy = false;
  }

  function notSaved(status, why) {
    if (status === 401) {
      say(SESSION_ENDED, true);
      offer(["sign-in"]);
    } else if (why.code === "already_ranked") {
      say("Not saved: this task was already ranked, in another tab or earlier.", true);
      offer(["reload-task", "next-task"], "Show the stored ranking");
    } else if (why.code === "already_skipped") {
      say("Not saved: this task was skipped, in another tab or earlier.", true);
      offer(["next-task"]);
    } else if (why.code === "lease_expired") {
      say("Not saved: your time on this task ran out, and other annotators have ranked it since.", true);
      offer(["next-task"]);
    } else if (why.code === "csrf_token") {
      say("Not saved: this page is out of date. Reload it (your ranking is kept) and submit again.", true);
      offer(["reload-task"], "Reload this page");
    } else {
      say("Not saved: " + why.text, true);
    }
  }

  function submit(confirmed) {
    if (busy || stored) return;
    if (!changed && !confirmed) {
      document.getElementById("confirm").hidden = false;
      document.getElementById("confirm-yes").focus();
      return;
    }
    busy = true;
    document.getElementById("confirm").hidden = true;
    offer([]);
    say("Saving…");
    var body = {
      order: order(),
      below: below(),
      all_bad: document.getElementById("all-bad").checked,
      rationale: document.getElementById("rationale").value || null,
      time_spent_ms: Date.now() - started
    };
    // Only a failure of this request means "not saved"; once it is stored, what fails after
    // (opening the next task) says so and never asks to send the ranking again.
    api(revising ? "PUT" : "POST", "/api/tasks/" + taskId + "/ranking", body).then(function (resp) {
      if (resp.ok) {
        isStored("ranked");
        say("Saved.");
        return goNext();
      }
      return refusal(resp).then(function (why) { notSaved(resp.status, why); busy = false; });
    }, function () { say("Network error: not saved. Try again.", true); busy = false; });
  }

  document.getElementById("submit").addEventListener("click", function () { submit(false); });
  document.getElementById("confirm-yes").addEventListener("click", function () { submit(true); });
  function keepRanking() {
    document.getElementById("confirm").hidden = true;
    var first = cards()[0];
    if (first) first.focus();
  }
  document.getElementById("confirm-no").addEventListener("click", keepRanking);
  // Escape answers "Keep ranking", as it closes a dialog
  document.getElementById("confirm").addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") { ev.preventDefault(); keepRanking(); }
  });
  document.getElementById("next-task").addEventListener("click", function () {
    if (busy) return;
    offer([]);
    say("Opening the next task…");
    goNext();
  });
  document.getElementById("reload-task").addEventListener("click", function () { window.location.reload(); });
  document.getElementById("all-bad").addEventListener("change", keepDraft);
  document.getElementById("rationale").addEventListener("input", keepDraft);

  var skip = document.getElementById("skip");
  if (skip) skip.addEventListener("click", function () {
    if (busy || stored) return;
    var reason = document.getElementById("skip-reason").value.trim();
    if (!reason) { say("Give a reason to skip.", true); return; }
    busy = true;
    offer([]);
    say("Skipping…");
    api("POST", "/api/tasks/" + taskId + "/skip", { reason: reason }).then(function (resp) {
      if (resp.ok) {
        isStored("skipped");
        return goNext();
      }
      return refusal(resp).then(function (why) {
        if (resp.status === 401) {
          say("Your session has ended: sign in again (in another tab), then skip again.", true);
          offer(["sign-in"]);
        } else if (resp.status === 409) {
          say("Not skipped: this task was already ranked or skipped, in another tab or earlier.", true);
          offer(["reload-task", "next-task"], "Show the task as it is now");
        } else {
          say("Not skipped: " + why.text, true);
        }
        busy = false;
      });
    }, function () { say("Network error: not skipped. Try again.", true); busy = false; });
  });

  // A page restored from the browser's back-forward cache shows the task as it was when it
  // was left, perhaps ranked since: it is loaded again (the draft, if any, comes back with it).
  window.addEventListener("pageshow", function (ev) { if (ev.persisted) window.location.reload(); });

  // --- lease countdown: how long this task stays held for this annotator
  var lease = document.getElementById("lease");
  if (lease) {
    var until = Date.now() + parseInt(lease.dataset.secondsLeft, 10) * 1000;
    keepLeaseAlive(parseInt(lease.dataset.leaseSeconds, 10) || 0, function (newUntil) {
      if (newUntil !== undefined) until = newUntil;
      return until;
    });
    var tick = function () {
      var left = Math.max(0, Math.round((until - Date.now()) / 1000));
      var m = Math.floor(left / 60), s = left % 60;
      lease.textContent = left > 0 ? "held for you: " + m + ":" + (s < 10 ? "0" : "") + s
                                   : "lease expired: submit soon, another annotator may take this task";
      lease.classList.toggle("expiring", left < 60);
      window.setTimeout(tick, 1000);  // on at 0:00 too: a renewal answered just then moves it on
    };
    tick();
  }

  // --- lease keep-alive: while the annotator works on the task (any input within the last
  // lease period), its lease is renewed every third of a lease period (at most once a minute
  // where the lease is long enough to allow it; a short one is renewed before half of it is
  // gone). An abandoned tab stops renewing, so its lease runs out and the prompt goes to
  // another annotator. A lease that ran out is not renewed by the server: the countdown says
  // so, and a ranking sent then still counts if the prompt has a free slot.
  function keepLeaseAlive(leaseS, leaseUntil) {
    if (!(leaseS > 0)) return;
    var everyMs = 1000 * Math.max(leaseS / 3, Math.min(60, leaseS / 2));
    var lastActive = Date.now();
    var active = function () { lastActive = Date.now(); };
    ["pointerdown", "keydown", "input", "wheel", "touchstart"].forEach(function (type) {
      document.addEventListener(type, active, { passive: true, capture: true });
    });
    window.addEventListener("scroll", active, { passive: true });
    var renew = function () {
      if (stored || leaseUntil() <= Date.now()) return;  // saved, skipped or run out: nothing to hold
      if (busy || Date.now() - lastActive >= leaseS * 1000) { window.setTimeout(renew, everyMs); return; }
      var sent = Date.now();
      // No retries of its own (a busy server's 503 waits for the next round) and no message:
      // the annotator did not ask for it.
      api("POST", "/api/tasks/" + taskId + "/lease", undefined, 0).then(function (resp) {
        if (resp.ok) leaseUntil(sent + leaseS * 1000);  // the server's lease ends later than this
        if (resp.status === 409) {
          // Ran out: the countdown says so. Ranked or skipped in another tab: a submit says so.
          return refusal(resp).then(function (why) { if (why.code === "lease_expired") leaseUntil(Date.now()); });
        }
        // A session that ended, a project left, a task gone: the submit tells the annotator.
        if (resp.status === 401 || resp.status === 403 || resp.status === 404) return;
        window.setTimeout(renew, everyMs);  // renewed, or a busy server: the next round
      }, function () { window.setTimeout(renew, everyMs); });  // offline for now: the next round
    };
    window.setTimeout(renew, everyMs);
  }

  restoreDraft();
  relabel();
  var first = cards()[0];
  if (first) first.focus({ preventScroll: true });
})();

// Copy buttons (the People page's new invite link): button[data-copy] copies the value of the
// read-only field it names. Where the clipboard API is missing or refused (plain http on
// another host than localhost) the field's text is selected and copied the old way, or left
// selected for Ctrl+C. The button is hidden until this script shows it.
(function () {
  "use strict";
  Array.prototype.forEach.call(document.querySelectorAll("button[data-copy]"), function (button) {
    var field = document.getElementById(button.dataset.copy);
    var status = document.getElementById(button.dataset.copyStatus);
    function say(text) { if (status) status.textContent = text; }
    function selectAndCopy() {
      field.focus();
      field.select();
      var copied = false;
      try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
      say(copied ? "Copied." : "Selected: press Ctrl+C (⌘C on a Mac) to copy.");
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      if (!navigator.clipboard || !window.isSecureContext) { selectAndCopy(); return; }
      navigator.clipboard.writeText(field.value).then(function () { say("Copied."); }, selectAndCopy);
    });
  });
})();
