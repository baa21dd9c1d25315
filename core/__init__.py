"""The torch-free, I/O-free core that the worker (`stream/`) and the model code (`models/`) both import:
the event contract, the sessions fold, the feature encoding and the output record schema."""
