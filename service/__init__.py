"""The FastAPI service: settings, database, auth, storage, one folder per resource, the task
queue and the reaper. It imports the method (fudlr) and never the workers."""
