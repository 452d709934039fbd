"""A stage process (``molink join``): receive steps, compute its layers, send them on."""
