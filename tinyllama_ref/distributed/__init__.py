"""Past one machine: data-parallel runs and pipeline stages on Ray actors (extra: [distributed])."""
