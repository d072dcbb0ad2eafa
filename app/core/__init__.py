"""The core both processes use: configuration, database and tables, the job state machine, queues,
storage, the recipe schema and upload vetting. Nothing here serves HTTP or imports torch."""
