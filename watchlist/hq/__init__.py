"""HQ's side of the watchlist: the register of missing persons, enrolment, release building, publishing."""
