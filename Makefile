# System install for systemd hosts (README, "As a systemd service"):  sudo make install
# `make install-files DESTDIR=/tmp/stage` stages the unit, users, spool rule and config only.
PYTHON      ?= python3
PREFIX      ?= /opt/relayd
UNITDIR     ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
TMPFILESDIR ?= /etc/tmpfiles.d
CONFDIR     ?= /etc/relayd
DESTDIR     ?=

.PHONY: install install-venv install-files uninstall

install: install-venv install-files
	systemd-sysusers $(SYSUSERSDIR)/relayd.conf
	systemd-tmpfiles --create $(TMPFILESDIR)/relayd.conf
	systemctl daemon-reload
	@echo "next: put the API key in $(CONFDIR)/credentials/xosum-api-key (0600), edit"
	@echo "      $(CONFDIR)/relayd.toml, then: systemctl enable --now relayd"

# relayd and its dependencies in their own venv: no system Python packages touched.
install-venv:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install --quiet --upgrade '.[redis]'

# The config is written once from config.example.toml, with secrets read as systemd
# credentials; an existing config is never overwritten.
install-files:
	install -D -m 0644 systemd/relayd.service $(DESTDIR)$(UNITDIR)/relayd.service
	install -D -m 0644 systemd/relayd.sysusers $(DESTDIR)$(SYSUSERSDIR)/relayd.conf
	install -D -m 0644 systemd/relayd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/relayd.conf
	install -d -m 0755 $(DESTDIR)$(CONFDIR)
	install -d -m 0700 $(DESTDIR)$(CONFDIR)/credentials
	test -e $(DESTDIR)$(CONFDIR)/relayd.toml || sed \
	    -e 's|"env:XOSUM_API_KEY"|"credential:xosum-api-key"|' \
	    -e 's|"env:XOSUM_WEBHOOK_SECRET"|"credential:xosum-webhook-secret"|' \
	    config.example.toml > $(DESTDIR)$(CONFDIR)/relayd.toml

# Leaves the state (/var/lib/relayd), the spool, the config and the user in place.
uninstall:
	-systemctl disable --now relayd
	rm -f $(DESTDIR)$(UNITDIR)/relayd.service $(DESTDIR)$(SYSUSERSDIR)/relayd.conf \
	    $(DESTDIR)$(TMPFILESDIR)/relayd.conf
	rm -rf $(DESTDIR)$(PREFIX)
	-systemctl daemon-reload
