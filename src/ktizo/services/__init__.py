"""Use cases (register, approve, render, authenticate…), one transaction each, shared by API, UI, CLI and jobs."""
