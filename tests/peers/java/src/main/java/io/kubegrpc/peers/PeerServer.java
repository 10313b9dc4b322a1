package io.kubegrpc.peers;

import io.grpc.InsecureServerCredentials;
import io.grpc.Server;
import io.grpc.ServerCredentials;
import io.grpc.ServerInterceptors;
import io.grpc.health.v1.HealthCheckResponse.ServingStatus;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.netty.shaded.io.netty.channel.EventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.MultiThreadIoEventLoopGroup;
import io.grpc.netty.shaded.io.netty.channel.nio.NioIoHandler;
import io.grpc.protobuf.services.HealthStatusManager;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.time.Duration;
import java.util.concurrent.TimeUnit;
import java.util.logging.Logger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * A grpc-java server that speaks the test suite's echo service ({@code kubegrpc.echo.v1.Echo},
 * hand-encoded: there is no protoc here) and grpc-java's own {@code grpc.health.v1.Health}
 * implementation ({@link HealthStatusManager}), so the Rust tests can run against a real
 * grpc-java peer.
 *
 * <pre>
 * peer-server-java --listen IP:PORT [--keepalive-enforcement default|permissive]
 *                  [--max-connection-age D] [--max-connection-age-grace D] [--not-serving]
 *                  [--tls-cert FILE --tls-key FILE [--client-ca FILE]]
 * </pre>
 *
 * <p>With {@code --tls-cert} and {@code --tls-key} it serves TLS instead of plaintext; with
 * {@code --client-ca} too, mutual TLS: clients must present a certificate signed by that CA. It
 * logs {@code client certificate serial HEX from IP:PORT} for each client certificate accepted
 * (see {@link PeerTls}).
 *
 * <p>Prints {@code listening on IP:PORT} once it accepts connections. On SIGTERM it sets every
 * health status NOT_SERVING, shuts down and waits at most 5 s for calls in flight (health Watch
 * streams never end on their own), then shuts down now.
 */
public final class PeerServer {
  private static final Logger logger = Logger.getLogger(PeerServer.class.getName());
  private static final long STOP_GRACE_SECONDS = 5;

  private PeerServer() {}

  public static void main(String[] args) throws Exception {
    Options options;
    try {
      options = Options.parse(args);
    } catch (IllegalArgumentException e) {
      System.err.println("peer-server-java: " + e.getMessage());
      System.err.println(Options.USAGE);
      System.exit(2);
      return;
    }

    Counters counters = new Counters();
    HealthStatusManager health = new HealthStatusManager(); // "" starts SERVING
    if (options.notServing) {
      health.setStatus(HealthStatusManager.SERVICE_NAME_ALL_SERVICES, ServingStatus.NOT_SERVING);
    }
    String address = formatAddress(options.listen);

    // NIO with our own server channel: it counts TCP connections and watches what the server
    // writes on each (see CountingServerChannel). A custom channel needs its own event loops.
    EventLoopGroup boss = new MultiThreadIoEventLoopGroup(1, NioIoHandler.newFactory());
    EventLoopGroup workers = new MultiThreadIoEventLoopGroup(2, NioIoHandler.newFactory());
    boolean tls = options.tlsCert != null;
    ServerCredentials credentials =
        tls
            ? PeerTls.credentials(options.tlsCert, options.tlsKey, options.clientCa)
            : InsecureServerCredentials.create();
    NettyServerBuilder builder =
        NettyServerBuilder.forAddress(options.listen, credentials)
            .channelFactory(() -> new CountingServerChannel(counters, tls))
            .bossEventLoopGroup(boss)
            .workerEventLoopGroup(workers)
            .addService(new EchoService(address, counters, health).definition())
            .addService(
                ServerInterceptors.intercept(
                    health.getHealthService(), new HealthCountingInterceptor(counters)));
    if (tls) {
      builder.addTransportFilter(new PeerTls.ClientCertificateLogger());
    }
    if (options.keepalivePermissive) {
      builder.permitKeepAliveTime(1, TimeUnit.MILLISECONDS).permitKeepAliveWithoutCalls(true);
    }
    if (options.maxConnectionAge != null) {
      builder.maxConnectionAge(options.maxConnectionAge.toNanos(), TimeUnit.NANOSECONDS);
    }
    if (options.maxConnectionAgeGrace != null) {
      builder.maxConnectionAgeGrace(options.maxConnectionAgeGrace.toNanos(), TimeUnit.NANOSECONDS);
    }
    Server server = builder.build().start();

    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  logger.info("stopping: every health status NOT_SERVING, then a graceful shutdown");
                  health.enterTerminalState();
                  server.shutdown();
                  try {
                    if (!server.awaitTermination(STOP_GRACE_SECONDS, TimeUnit.SECONDS)) {
                      logger.info(
                          "graceful shutdown did not finish within "
                              + STOP_GRACE_SECONDS
                              + " s (open health Watch streams?): shutting down now");
                      server.shutdownNow();
                      server.awaitTermination(1, TimeUnit.SECONDS);
                    }
                  } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                  }
                  boss.shutdownGracefully(0, 0, TimeUnit.SECONDS);
                  workers.shutdownGracefully(0, 0, TimeUnit.SECONDS);
                  logger.info("stopped");
                },
                "peer-server-shutdown"));

    logger.info(
        "grpc-java server: keepalive enforcement "
            + (options.keepalivePermissive ? "permissive" : "default")
            + ", max connection age "
            + options.maxConnectionAge
            + ", grace "
            + options.maxConnectionAgeGrace
            + ", not serving "
            + options.notServing
            + ", tls "
            + tls
            + ", client ca "
            + options.clientCa);
    System.out.println("listening on " + address);
    System.out.flush();
    server.awaitTermination();
  }

  /** {@code ip:port}, as Rust's and Go's socket addresses print. */
  static String formatAddress(InetSocketAddress address) {
    String ip = address.getAddress().getHostAddress();
    return (ip.contains(":") ? "[" + ip + "]" : ip) + ":" + address.getPort();
  }

  /** The command line. */
  static final class Options {
    static final String USAGE =
        "usage: peer-server-java --listen IP:PORT [--keepalive-enforcement default|permissive]\n"
            + "                        [--max-connection-age DURATION] [--max-connection-age-grace DURATION]\n"
            + "                        [--not-serving]      (durations like 2s, 500ms, 1m30s)\n"
            + "                        [--tls-cert FILE --tls-key FILE [--client-ca FILE]]";

    InetSocketAddress listen;
    boolean keepalivePermissive;
    Duration maxConnectionAge;
    Duration maxConnectionAgeGrace;
    boolean notServing;
    String tlsCert;
    String tlsKey;
    String clientCa;

    static Options parse(String[] args) {
      Options options = new Options();
      for (int i = 0; i < args.length; i++) {
        String arg = args[i];
        String value = null;
        int equals = arg.indexOf('=');
        if (arg.startsWith("--") && equals > 0) {
          value = arg.substring(equals + 1);
          arg = arg.substring(0, equals);
        }
        switch (arg) {
          case "--not-serving" -> options.notServing = true;
          case "--listen", "--keepalive-enforcement", "--max-connection-age",
              "--max-connection-age-grace", "--tls-cert", "--tls-key", "--client-ca" -> {
            if (value == null) {
              if (i + 1 >= args.length) {
                throw new IllegalArgumentException(arg + " needs a value");
              }
              value = args[++i];
            }
            switch (arg) {
              case "--listen" -> options.listen = parseAddress(value);
              case "--keepalive-enforcement" -> {
                if (!value.equals("default") && !value.equals("permissive")) {
                  throw new IllegalArgumentException(
                      "--keepalive-enforcement must be default or permissive, not " + value);
                }
                options.keepalivePermissive = value.equals("permissive");
              }
              case "--max-connection-age" -> options.maxConnectionAge = parseDuration(value);
              case "--tls-cert" -> options.tlsCert = value;
              case "--tls-key" -> options.tlsKey = value;
              case "--client-ca" -> options.clientCa = value;
              default -> options.maxConnectionAgeGrace = parseDuration(value);
            }
          }
          default -> throw new IllegalArgumentException("unknown argument " + args[i]);
        }
      }
      if (options.listen == null) {
        throw new IllegalArgumentException("--listen IP:PORT is required");
      }
      if ((options.tlsCert == null) != (options.tlsKey == null)) {
        throw new IllegalArgumentException("--tls-cert and --tls-key go together");
      }
      if (options.clientCa != null && options.tlsCert == null) {
        throw new IllegalArgumentException("--client-ca needs --tls-cert and --tls-key");
      }
      return options;
    }

    static InetSocketAddress parseAddress(String value) {
      int colon = value.lastIndexOf(':');
      if (colon <= 0) {
        throw new IllegalArgumentException("--listen wants IP:PORT, not " + value);
      }
      String host = value.substring(0, colon);
      if (host.startsWith("[") && host.endsWith("]")) {
        host = host.substring(1, host.length() - 1);
      }
      try {
        // An IP literal: getByName does no lookup for one.
        return new InetSocketAddress(
            InetAddress.getByName(host), Integer.parseInt(value.substring(colon + 1)));
      } catch (Exception e) {
        throw new IllegalArgumentException("--listen wants IP:PORT, not " + value);
      }
    }

    private static final Pattern DURATION_PART = Pattern.compile("(\\d+(?:\\.\\d+)?)(ns|us|ms|s|m|h)");

    /** A Go-style duration: 2s, 500ms, 1m30s, 1.5s. */
    static Duration parseDuration(String value) {
      Matcher matcher = DURATION_PART.matcher(value);
      long nanos = 0;
      int end = 0;
      while (matcher.find() && matcher.start() == end) {
        double amount = Double.parseDouble(matcher.group(1));
        long unit =
            switch (matcher.group(2)) {
              case "ns" -> 1L;
              case "us" -> 1_000L;
              case "ms" -> 1_000_000L;
              case "s" -> 1_000_000_000L;
              case "m" -> 60_000_000_000L;
              default -> 3_600_000_000_000L;
            };
        nanos += Math.round(amount * unit);
        end = matcher.end();
      }
      if (value.isEmpty() || end != value.length()) {
        throw new IllegalArgumentException("not a duration (like 2s, 500ms): " + value);
      }
      return Duration.ofNanos(nanos);
    }
  }
}
