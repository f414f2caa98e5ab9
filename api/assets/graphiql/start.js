// Starts GraphiQL against this service. Everything the page runs is served by
// the binary itself (see ops/vendor-graphiql.sh); nothing comes from a CDN.
//
// Credentials: put {"Authorization": "Bearer alk_…"} in the Headers tab. The
// page sends them with every HTTP request and as the WebSocket
// connection_init payload; it keeps them only for this tab (headers are not
// persisted to local storage).
(function () {
  "use strict";
  var here = window.location;
  var socket = (here.protocol === "https:" ? "wss://" : "ws://") + here.host + "/graphql/ws";
  var fetcher = GraphiQL.createFetcher({
    url: here.origin + "/graphql",
    subscriptionUrl: socket,
  });
  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(
    React.createElement(GraphiQL, {
      fetcher: fetcher,
      shouldPersistHeaders: false,
      defaultEditorToolsVisibility: "headers",
      defaultHeaders: '{\n  "Authorization": "Bearer "\n}',
    })
  );
})();
