"""User-facing errors: one line, names the file/line/key and the fix; the CLI exits 2."""


class UserError(Exception):
    """Bad input from the user (project file, data file, command line).

    The message must be a single line that names what is wrong (file, line, key)
    and what to do about it. The CLI prints it without a traceback and exits 2.
    """
