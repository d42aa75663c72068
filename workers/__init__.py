"""The Celery worker: registers the service's tasks (service/queue.py) and runs the method
under a lease. It imports the service and the method; nothing imports it."""
