"""What receivers say back: SMTP reply classification (rules as data) and
delivery status notification (DSN) parsing."""
