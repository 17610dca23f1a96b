// Live state: while a job shown on the page has not ended, ask the dashboard for its state
// every few seconds and update the badge, stage and progress in place (no reload).
(function () {
  "use strict";
  var TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED"];
  var body = document.body;
  var endpoint = body.dataset.statusUrl;
  var interval = Number(body.dataset.pollMs) || 3000;

  function isLive(element) {
    return TERMINAL.indexOf(element.dataset.state) < 0;
  }

  function liveElements() {
    return Array.prototype.filter.call(document.querySelectorAll("[data-job-id]"), isLive);
  }

  function setText(container, field, text) {
    container.querySelectorAll('[data-field="' + field + '"]').forEach(function (node) {
      node.textContent = text;
    });
  }

  function apply(element, job) {
    var ended = TERMINAL.indexOf(job.state) >= 0;
    element.dataset.state = job.state;
    element.querySelectorAll('[data-field="state"]').forEach(function (badge) {
      // badge_text and badge_class carry the verdict: a SUCCEEDED job that missed its
      // target is amber, never the green of one that met it.
      badge.textContent = job.badge_text || job.state;
      badge.className = "badge state-" + (job.badge_class || job.state.toLowerCase());
    });
    setText(element, "stage", job.stage || "—");
    setText(element, "percent", Math.round(job.percent) + "%");
    setText(element, "variants_done", String(job.variants_done));
    setText(element, "lambdas_evaluated", String(job.lambdas_evaluated));
    element.querySelectorAll('[data-field="progress"]').forEach(function (bar) {
      bar.value = job.percent;
    });
    if (ended || job.state === "CANCELLING") {
      element.querySelectorAll("[data-hide-when-ended]").forEach(function (node) {
        node.hidden = true;
      });
    }
    if (ended) {
      element.querySelectorAll("[data-show-when-ended]").forEach(function (node) {
        node.hidden = false;
      });
    }
  }

  function poll() {
    var elements = liveElements();
    if (!elements.length || !endpoint) {
      return; // nothing left to follow
    }
    var ids = [];
    elements.forEach(function (element) {
      if (ids.indexOf(element.dataset.jobId) < 0) ids.push(element.dataset.jobId);
    });
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch(endpoint + "?" + query, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign(body.dataset.signInUrl);
          return null;
        }
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data === null) return;
        data.jobs.forEach(function (job) {
          elements.forEach(function (element) {
            if (element.dataset.jobId === job.id) apply(element, job);
          });
        });
      })
      .catch(function () { /* a network hiccup: try again next time */ })
      .then(function () { window.setTimeout(poll, interval); });
  }

  window.setTimeout(poll, interval);
})();
