"""The error a wrong setting raises: one sentence naming the field.

Lives below every subpackage (data/ and common/ raise it while reading a
config) so that validate.py, which checks whole configs on top of the
package, can import from them without a cycle."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""
