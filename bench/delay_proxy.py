#!/usr/bin/env python3
"""TCP proxy on 127.0.0.1 that adds DELAY_MS to every piece of data, in each direction.
  delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS     (10 ms each way = 20 ms round trip)
Pieces are timestamped on arrival and written at arrival + delay, in order: the delay is a
latency, not a per-piece pause, so pieces arriving 1 ms apart leave 1 ms apart, DELAY_MS later.
End of stream is forwarded (half-close) after the same delay; a reset closes both sides."""
import asyncio
import sys

LISTEN_PORT, TARGET_PORT, DELAY = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000


async def pipe(reader, writer):
    """Reads into a queue of (arrival, data); a writer task delivers each at arrival + DELAY."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue(maxsize=4096)

    async def receive():
        while data := await reader.read(65536):
            await queue.put((loop.time(), data))
        await queue.put((loop.time(), b""))

    async def deliver():
        while True:
            arrival, data = await queue.get()
            await asyncio.sleep(arrival + DELAY - loop.time())
            if not data:  # end of stream, after the same delay as the data before it
                return writer.can_write_eof() and writer.write_eof()
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(receive()), asyncio.create_task(deliver())]
    try:
        await asyncio.gather(*tasks)  # the first failure of either ends the pipe
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def handle(client_reader, client_writer):
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", TARGET_PORT)
    except OSError:
        client_writer.close()
        return
    pipes = [asyncio.create_task(pipe(client_reader, server_writer)),
             asyncio.create_task(pipe(server_reader, client_writer))]
    # Both directions done (or either one failed): close both sockets.
    done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    for writer in (client_writer, server_writer):
        writer.close()
    await asyncio.gather(*pipes, *(w.wait_closed() for w in (client_writer, server_writer)),
                         return_exceptions=True)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN_PORT, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
