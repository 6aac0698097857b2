"""Network boot plumbing: dnsmasq (DHCP/proxyDHCP + TFTP) under supervision, iPXE binaries, Talos boot assets."""
