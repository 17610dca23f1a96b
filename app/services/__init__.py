"""Business rules. Services change rows through repositories and never commit."""
