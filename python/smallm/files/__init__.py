"""Everything smallm writes goes through here: atomic files and folders (:mod:`.atomic`), the lock on a
directory a command writes in (:mod:`.lock`), and the one rule for what a command may replace
(:mod:`.destination`)."""
