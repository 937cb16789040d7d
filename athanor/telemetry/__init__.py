"""Request telemetry that outlives the daemon: one record per finished request, kept in SQLite under
ATHANOR_HOME.

    ``recorder.py``  the daemon's side: the request path appends a tuple to a buffer (``Recorder.record``); a
                     task writes the buffer in one transaction per second, off the event loop
    ``db.py``        the file: schema, batch writes with retention, and the queries the admin API and the CLI
                     share (the CLI reads the file itself when no daemon runs)

Standard library only: ``athanor telemetry`` imports no HTTP framework.
"""
