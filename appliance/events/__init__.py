"""Events from the PoPs' spools to the origin (issue 23)."""
