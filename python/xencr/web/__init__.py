"""The status page and the auditors' reports: data gathering (`data`), charts as inline SVG
(`charts`), HTML (`render`, `report`), and the HTTP server with its access rule (`server`)."""
