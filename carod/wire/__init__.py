"""The wire format: what a message, a job ad, a reply, an advert and a control request are. Pure: no I/O."""
