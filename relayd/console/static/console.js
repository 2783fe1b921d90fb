// relayd console: keeps the live part of a page current, and asks before a destructive action.
// It fetches the page's own URL with X-Relayd-Partial: 1 and swaps in the fragment the server
// rendered (the same template, escaped the same way); DOMParser runs no script it parses.
"use strict";

(function () {
  const live = document.getElementById("live");
  const notice = document.getElementById("notice");

  function say(text) {
    if (notice) {
      notice.textContent = text;
      notice.hidden = false;
    }
  }

  async function refresh(every) {
    if (!document.hidden) {
      try {
        const resp = await fetch(location.href, {
          headers: { "X-Relayd-Partial": "1" },
          credentials: "same-origin",
          cache: "no-store",
        });
        if (resp.status === 401) {
          say("Signed out: reload the page to sign in again.");
          return;
        }
        if (resp.ok) {
          const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
          live.replaceChildren(...doc.body.childNodes);
          live.dataset.updated = String(Date.now());
          if (notice) notice.hidden = true;
        }
      } catch (err) {
        say("relayd does not answer; trying again.");
      }
    }
    setTimeout(refresh, every, every);
  }

  if (live && live.dataset.refresh) {
    const every = Number(live.dataset.refresh) * 1000;
    setTimeout(refresh, every, every);
  }

  document.addEventListener("submit", function (event) {
    const question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
})();
