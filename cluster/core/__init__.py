"""The engine core and its links: the server an engine replica runs, the client an API\nprocess holds, and the framing between them (torch-free but for what the replica hosts)."""
