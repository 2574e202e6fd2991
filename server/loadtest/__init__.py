"""`deltamux loadtest`: a multi-tenant load generator and reporter for a running deltamux server.

- mix.py: which task each request goes to (uniform, Zipf, or a recorded trace);
- prompts.py: the prompt file (plain text or JSONL);
- runner.py: the async client (open-loop Poisson arrivals or a closed loop of users);
- report.py: percentiles, JSON and CSV files, and the server's /metrics before and after;
- plots.py: PNG plots (matplotlib, imported only when plotting).
"""
