"""Images in: reading and resizing (images), dataset layouts (datasets), the synthetic demo set (synthetic)."""
