"""What turns input into messages: the spool-directory reader, pickup files and
campaign jobs (templates + recipients)."""
