"""The ground layer: settings, database and schema, lineage, identity. Imports nothing of the project."""
