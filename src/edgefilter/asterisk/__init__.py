"""Everything that speaks Asterisk: FastAGI, AMI, routes, mirror, star codes, challenge, appeals, the double."""
