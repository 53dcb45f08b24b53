"""The learning cycle every learner shares (update, gate, record, swap), below the agent and the server; it knows no environment and no HTTP."""
