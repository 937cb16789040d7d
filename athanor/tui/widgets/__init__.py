"""The TUI's widgets, grouped by the area of the screen they fill."""
