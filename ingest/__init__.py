"""The ingestion worker: loaders, chunking, the pipeline and the job loop."""
