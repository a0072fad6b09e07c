"""Operating deepserve: Prometheus metrics (`metrics`), one structured log line per request (`logs`), and the
per-request record that ties them together (`requests`). Graceful shutdown lives in `deepserve.shutdown`."""
