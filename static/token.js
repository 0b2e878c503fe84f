/* Runs first, before anything else loads: the start-up URL's ?token= leaves the address bar (and so the
 * history) at once; app.js trades it for the sign-in cookie and forgets it. */
(function () {
  "use strict";
  const url = new URL(window.location.href);
  const token = url.searchParams.get("token");
  if (token === null) return;
  try { window.sessionStorage.setItem("parley.token", token); } catch (e) { /* storage disabled: sign in by hand */ }
  url.searchParams.delete("token");
  window.history.replaceState(null, "", url.pathname + url.search + url.hash);
})();
