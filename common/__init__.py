"""What every part of the project shares and that belongs to none of them: the error family (`errors`) and the
command-line plumbing of the tools (`cli`)."""
