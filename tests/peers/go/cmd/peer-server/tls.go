package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"net"
	"os"

	"google.golang.org/grpc/credentials"
)

// serverTLS makes grpc-go's TLS credentials (ALPN h2) from a certificate and key, and with a
// client CA also requires and verifies client certificates (mutual TLS). The credentials log the
// serial number of every client certificate accepted, and watch the plaintext side of each
// connection for GOAWAY too_many_pings (the listener below TLS sees only records).
func serverTLS(certFile, keyFile, clientCAFile string, stats *counters) (credentials.TransportCredentials, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("cannot load the TLS certificate %s and key %s: %w", certFile, keyFile, err)
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCAFile != "" {
		caPEM, err := os.ReadFile(clientCAFile)
		if err != nil {
			return nil, fmt.Errorf("cannot read the client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("no PEM certificate in the client CA file %s", clientCAFile)
		}
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return &observedTLS{TransportCredentials: credentials.NewTLS(config), stats: stats}, nil
}

// observedTLS is grpc-go's TLS, logging each handshake's outcome.
type observedTLS struct {
	credentials.TransportCredentials
	stats *counters
}

// ServerHandshake logs "client certificate serial HEX from IP:PORT" for each accepted client
// certificate (the tests read these lines: tests/src/peers.rs) and failed handshakes with their
// reason.
func (c *observedTLS) ServerHandshake(rawConn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(rawConn)
	if err != nil {
		log.Printf("TLS handshake with %v failed: %v", rawConn.RemoteAddr(), err)
		return nil, nil, err
	}
	if tlsInfo, ok := info.(credentials.TLSInfo); ok && len(tlsInfo.State.PeerCertificates) > 0 {
		log.Printf("client certificate serial %s from %v",
			tlsInfo.State.PeerCertificates[0].SerialNumber.Text(16), rawConn.RemoteAddr())
	}
	return &goAwayWatchingConn{Conn: conn, stats: c.stats}, info, nil
}

func (c *observedTLS) Clone() credentials.TransportCredentials {
	return &observedTLS{TransportCredentials: c.TransportCredentials.Clone(), stats: c.stats}
}
