"""The SCIM 2.0 face of the hub: schemas, storage on SQLAlchemy, filters translated to SQL."""
