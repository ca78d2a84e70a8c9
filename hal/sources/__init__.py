"""Built-in source plugins; hal.registry imports them so that their decorators register them."""
