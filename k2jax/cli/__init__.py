"""Command-line entry points (thin absl mains over importable modules)."""
