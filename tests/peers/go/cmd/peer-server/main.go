// Command peer-server is a grpc-go server that speaks the test suite's echo service
// (kubegrpc.echo.v1.Echo, hand-encoded in internal/echo: there is no protoc here) and grpc-go's
// own grpc.health.v1.Health implementation, so the Rust tests can run against a real grpc-go
// peer.
//
//	peer-server --listen IP:PORT [--keepalive-enforcement default|permissive]
//	            [--max-connection-age D] [--max-connection-age-grace D] [--not-serving]
//	            [--capacity N] [--work D] [--orca [--orca-min-interval D]]
//	            [--tls-cert FILE --tls-key FILE [--client-ca FILE]]
//
// With --capacity and --work each Echo call holds one of N worker slots for the work's time;
// with --orca the server also serves grpc-go's out-of-band ORCA service (OpenRcaService), whose
// application utilization is the slots' busy time over the last ~5 s divided by that time and the
// capacity, with the Echo calls' QPS and EPS over the same window (see load.go).
//
// With --tls-cert and --tls-key it serves TLS (ALPN h2) instead of plaintext; with --client-ca
// too, mutual TLS: clients must present a certificate signed by that CA. It logs
// "client certificate serial HEX from IP:PORT" for each client certificate accepted (see tls.go).
//
// It prints "listening on IP:PORT" once it accepts connections. On SIGTERM it sets every health
// status NOT_SERVING, then stops gracefully (at most 5 s, then forcefully: grpc-go's health Watch
// streams never end on their own, so GracefulStop alone would wait for them forever).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"kubegrpc.io/peers/internal/echo"
)

// stopGrace bounds the graceful stop on SIGTERM, as grpc-java's awaitTermination does.
const stopGrace = 5 * time.Second

// counters are what Echo/Stats reports.
type counters struct {
	requests            atomic.Uint64
	connectionsAccepted atomic.Uint64
	connectionsOpen     atomic.Int64
	healthWatchesOpen   atomic.Int64
	healthChecks        atomic.Uint64
	tooManyPings        atomic.Uint64
}

func main() {
	listen := flag.String("listen", "", "the address to listen on, IP:PORT (required)")
	enforcement := flag.String("keepalive-enforcement", "default",
		"default (grpc-go's: pings at most every 5 min, none without calls) or permissive (pings every 1 ms, also without calls)")
	maxAge := flag.Duration("max-connection-age", 0, "keepalive.ServerParameters.MaxConnectionAge (0: grpc-go's default, infinite)")
	maxAgeGrace := flag.Duration("max-connection-age-grace", 0, "keepalive.ServerParameters.MaxConnectionAgeGrace (0: grpc-go's default, infinite)")
	notServing := flag.Bool("not-serving", false, "start with the whole server (\"\") NOT_SERVING")
	capacity := flag.Int("capacity", 0, "Echo worker slots: calls beyond them wait for a slot (0: no limit)")
	work := flag.Duration("work", 0, "how long each Echo call works, holding a slot (0: no work)")
	orcaOn := flag.Bool("orca", false, "serve ORCA out-of-band load reports (xds.service.orca.v3.OpenRcaService)")
	orcaMinInterval := flag.Duration("orca-min-interval", 30*time.Second, "the ORCA streams' minimum reporting interval (default: grpc-go's own floor, 30 s; lower values need load.go's override)")
	tlsCert := flag.String("tls-cert", "", "serve TLS with this certificate chain (PEM file; needs --tls-key)")
	tlsKey := flag.String("tls-key", "", "the private key of --tls-cert (PEM file)")
	clientCA := flag.String("client-ca", "", "mutual TLS: require client certificates signed by this CA (PEM file; needs --tls-cert)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("peer-server-go: ")
	if *listen == "" || flag.NArg() != 0 || *capacity < 0 || *work < 0 || *orcaMinInterval <= 0 ||
		(*tlsCert == "") != (*tlsKey == "") || (*clientCA != "" && *tlsCert == "") {
		flag.Usage()
		os.Exit(2)
	}
	serveTLS := *tlsCert != ""

	var options []grpc.ServerOption
	switch *enforcement {
	case "default":
	case "permissive":
		options = append(options, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             time.Millisecond, // 0 would mean grpc-go's default (5 min)
			PermitWithoutStream: true,
		}))
	default:
		log.Fatalf("--keepalive-enforcement must be default or permissive, not %q", *enforcement)
	}
	if *maxAge != 0 || *maxAgeGrace != 0 {
		// Zero fields keep grpc-go's defaults (infinite age and grace, 2 h keepalive time).
		options = append(options, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      *maxAge,
			MaxConnectionAgeGrace: *maxAgeGrace,
		}))
	}

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	address := listener.Addr().String()
	stats := &counters{}
	if serveTLS {
		creds, err := serverTLS(*tlsCert, *tlsKey, *clientCA, stats)
		if err != nil {
			log.Fatal(err)
		}
		options = append(options, grpc.Creds(creds))
	}
	echoLoad := newLoad(*capacity, *work, time.Now())

	healthServer := health.NewServer() // "" starts SERVING
	if *notServing {
		healthServer.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	}
	options = append(options,
		grpc.ForceServerCodecV2(echo.NewCodec()),
		grpc.ChainUnaryInterceptor(stats.countHealthChecks),
		grpc.ChainStreamInterceptor(stats.countHealthWatches),
	)
	server := grpc.NewServer(options...)
	healthpb.RegisterHealthServer(server, healthServer)
	server.RegisterService(&echoServiceDesc, &echoService{address: address, stats: stats, health: healthServer, load: echoLoad})
	if *orcaOn {
		recorder, err := registerORCA(server, *orcaMinInterval)
		if err != nil {
			log.Fatalf("cannot serve ORCA: %v", err)
		}
		go echoLoad.publish(context.Background(), recorder)
	}

	served := make(chan error, 1)
	go func() {
		served <- server.Serve(&countingListener{Listener: listener, stats: stats, watchGoAways: !serveTLS})
	}()
	log.Printf("grpc-go server: keepalive enforcement %s, max connection age %v, grace %v, not serving %v, "+
		"capacity %d, work %v, orca %v (min interval %v), tls %v, client ca %q",
		*enforcement, *maxAge, *maxAgeGrace, *notServing, *capacity, *work, *orcaOn, *orcaMinInterval, serveTLS, *clientCA)
	fmt.Printf("listening on %s\n", address)
	_ = os.Stdout.Sync()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-served:
		log.Fatalf("serve: %v", err)
	case sig := <-signals:
		log.Printf("%v: setting every health status NOT_SERVING, then stopping gracefully", sig)
	}
	healthServer.Shutdown()
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
		log.Printf("stopped gracefully")
	case <-time.After(stopGrace):
		log.Printf("graceful stop did not finish within %v (open health Watch streams?): stopping", stopGrace)
		server.Stop()
	}
}

// === health interceptors ===

const (
	healthCheckMethod = "/grpc.health.v1.Health/Check"
	healthWatchMethod = "/grpc.health.v1.Health/Watch"
)

func (c *counters) countHealthChecks(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	reply, err := handler(ctx, req)
	if info.FullMethod == healthCheckMethod {
		c.healthChecks.Add(1)
	}
	return reply, err
}

func (c *counters) countHealthWatches(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod == healthWatchMethod {
		c.healthWatchesOpen.Add(1)
		defer c.healthWatchesOpen.Add(-1)
	}
	return handler(srv, ss)
}

// === the Echo service, registered by hand ===

type echoService struct {
	address string
	stats   *counters
	health  *health.Server
	load    *load
}

// echoServer is the handler type of echoServiceDesc (RegisterService checks the implementation
// against it).
type echoServer interface {
	echo(ctx context.Context, request []byte) ([]byte, error)
	statsReply() []byte
	setHealth(request []byte) ([]byte, error)
}

var echoServiceDesc = grpc.ServiceDesc{
	ServiceName: echo.ServiceName,
	HandlerType: (*echoServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Echo", Handler: unary("Echo", func(s echoServer, ctx context.Context, in []byte) ([]byte, error) { return s.echo(ctx, in) })},
		{MethodName: "Stats", Handler: unary("Stats", func(s echoServer, _ context.Context, _ []byte) ([]byte, error) { return s.statsReply(), nil })},
		{MethodName: "SetHealth", Handler: unary("SetHealth", func(s echoServer, _ context.Context, in []byte) ([]byte, error) { return s.setHealth(in) })},
	},
	Metadata: "kubegrpc/echo/v1/echo.proto",
}

// unary makes a grpc.MethodDesc handler whose request and reply are raw protobuf bytes (see
// echo.Codec), going through the server's unary interceptors as generated code does.
func unary(method string, call func(echoServer, context.Context, []byte) ([]byte, error)) grpc.MethodHandler {
	fullMethod := "/" + echo.ServiceName + "/" + method
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		var in []byte
		if err := dec(&in); err != nil {
			return nil, err
		}
		if interceptor == nil {
			return call(srv.(echoServer), ctx, in)
		}
		info := &grpc.UnaryServerInfo{Server: srv, FullMethod: fullMethod}
		return interceptor(ctx, in, info, func(ctx context.Context, req any) (any, error) {
			return call(srv.(echoServer), ctx, req.([]byte))
		})
	}
}

// echo: EchoRequest { string message = 1; uint32 delay_ms = 2; } ->
// EchoReply { string message = 1; string backend = 2; }
func (s *echoService) echo(ctx context.Context, request []byte) (reply []byte, err error) {
	defer func() { s.load.recordCall(err == nil) }()
	var message string
	var delayMs uint64
	err = echo.DecodeFields(request, func(num protowire.Number, typ protowire.Type, value []byte, varint uint64) {
		switch {
		case num == 1 && typ == protowire.BytesType:
			message = string(value)
		case num == 2 && typ == protowire.VarintType:
			delayMs = uint64(uint32(varint))
		}
	})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad EchoRequest: %v", err)
	}
	if err := s.load.doWork(ctx); err != nil {
		return nil, err
	}
	// Waiting, not working: the delay holds no slot.
	if delayMs > 0 {
		timer := time.NewTimer(time.Duration(delayMs) * time.Millisecond)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	s.stats.requests.Add(1)
	reply = echo.AppendString(reply, 1, message)
	reply = echo.AppendString(reply, 2, s.address)
	return reply, nil
}

// statsReply: StatsReply { uint64 requests = 1; connections_accepted = 2; connections_open = 3;
// health_watches_open = 4; health_checks = 5; too_many_pings = 6; }
func (s *echoService) statsReply() []byte {
	var reply []byte
	reply = echo.AppendUint64(reply, 1, s.stats.requests.Load())
	reply = echo.AppendUint64(reply, 2, s.stats.connectionsAccepted.Load())
	reply = echo.AppendUint64(reply, 3, uint64(max(s.stats.connectionsOpen.Load(), 0)))
	reply = echo.AppendUint64(reply, 4, uint64(max(s.stats.healthWatchesOpen.Load(), 0)))
	reply = echo.AppendUint64(reply, 5, s.stats.healthChecks.Load())
	reply = echo.AppendUint64(reply, 6, s.stats.tooManyPings.Load())
	return reply
}

// setHealth: SetHealthRequest { string service = 1; bool serving = 2; } -> SetHealthReply {}
func (s *echoService) setHealth(request []byte) ([]byte, error) {
	var service string
	var serving bool
	err := echo.DecodeFields(request, func(num protowire.Number, typ protowire.Type, value []byte, varint uint64) {
		switch {
		case num == 1 && typ == protowire.BytesType:
			service = string(value)
		case num == 2 && typ == protowire.VarintType:
			serving = varint != 0
		}
	})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad SetHealthRequest: %v", err)
	}
	servingStatus := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		servingStatus = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus(service, servingStatus)
	log.Printf("health of %q set to %v", service, servingStatus)
	return []byte{}, nil
}

// === connection counting and the GOAWAY too_many_pings detector ===

// countingListener counts connections; on plaintext connections it also watches for GOAWAY
// too_many_pings (with TLS, observedTLS does, above the TLS records).
type countingListener struct {
	net.Listener
	stats        *counters
	watchGoAways bool
}

func (l *countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.stats.connectionsAccepted.Add(1)
	l.stats.connectionsOpen.Add(1)
	counted := &countingConn{Conn: conn, stats: l.stats}
	if !l.watchGoAways {
		return counted, nil
	}
	return &goAwayWatchingConn{Conn: counted, stats: l.stats}, nil
}

// countingConn counts itself closed once.
type countingConn struct {
	net.Conn
	stats     *counters
	closeOnce sync.Once
}

func (c *countingConn) Close() error {
	c.closeOnce.Do(func() { c.stats.connectionsOpen.Add(-1) })
	return c.Conn.Close()
}

// goAwayWatchingConn watches the server's outgoing HTTP/2 frames for GOAWAY ENHANCE_YOUR_CALM
// "too_many_pings" (what keepalive enforcement sends).
type goAwayWatchingConn struct {
	net.Conn
	stats  *counters
	mu     sync.Mutex
	frames frameScanner
}

func (c *goAwayWatchingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.mu.Lock()
	found := c.frames.scan(b[:n])
	c.mu.Unlock()
	if found > 0 {
		c.stats.tooManyPings.Add(uint64(found))
		log.Printf("sent GOAWAY ENHANCE_YOUR_CALM too_many_pings to %v", c.RemoteAddr())
	}
	return n, err
}

const (
	frameHeaderLen     = 9
	frameTypeGoAway    = 0x7
	errEnhanceYourCalm = 0xb
	tooManyPings       = "too_many_pings"
	// goAwayKeep is how much of a GOAWAY payload the scanner keeps: last stream id, error code
	// and enough debug data to compare with "too_many_pings".
	goAwayKeep = 8 + len(tooManyPings)
)

// frameScanner follows an HTTP/2 frame stream written by a server (frames only: the server's
// connection preface is a SETTINGS frame, not the client's magic string), across writes that
// split frames anywhere.
type frameScanner struct {
	header    [frameHeaderLen]byte
	headerLen int
	remaining int    // payload bytes of the current frame still to come
	goAway    bool   // the current frame is a GOAWAY
	payload   []byte // the GOAWAY's first goAwayKeep payload bytes
	length    int    // the GOAWAY's payload length
}

// scan consumes b and returns how many GOAWAY ENHANCE_YOUR_CALM "too_many_pings" frames it
// completed.
func (s *frameScanner) scan(b []byte) int {
	found := 0
	for len(b) > 0 {
		if s.headerLen < frameHeaderLen {
			n := copy(s.header[s.headerLen:], b)
			s.headerLen += n
			b = b[n:]
			if s.headerLen < frameHeaderLen {
				break
			}
			s.remaining = int(s.header[0])<<16 | int(s.header[1])<<8 | int(s.header[2])
			s.length = s.remaining
			s.goAway = s.header[3] == frameTypeGoAway
			s.payload = s.payload[:0]
		}
		n := min(s.remaining, len(b))
		if s.goAway && len(s.payload) < goAwayKeep {
			s.payload = append(s.payload, b[:min(n, goAwayKeep-len(s.payload))]...)
		}
		s.remaining -= n
		b = b[n:]
		if s.remaining == 0 {
			if s.goAway && isTooManyPings(s.payload, s.length) {
				found++
			}
			s.headerLen = 0
			s.goAway = false
		}
	}
	return found
}

func isTooManyPings(payload []byte, length int) bool {
	if length != goAwayKeep || len(payload) != goAwayKeep {
		return false
	}
	code := uint32(payload[4])<<24 | uint32(payload[5])<<16 | uint32(payload[6])<<8 | uint32(payload[7])
	return code == errEnhanceYourCalm && string(payload[8:]) == tooManyPings
}
