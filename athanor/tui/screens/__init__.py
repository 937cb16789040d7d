"""One Screen per view: the main view, full-screen logs, describe, events, and the dialogs."""
