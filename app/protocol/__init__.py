"""Wire schemas of the HTTP API, shared by the routes (app.api) and the serving layer."""
